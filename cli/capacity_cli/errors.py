"""capctl's exit codes and its one expected failure."""

from __future__ import annotations

from capacity_api.cluster_access import EXIT_NO_CLUSTER

EXIT_OK = 0
EXIT_ERROR = 1
"""The object is missing or the API server refused the request."""
EXIT_UNREACHABLE = EXIT_NO_CLUSTER
"""No usable cluster configuration, or the API server cannot be reached (2)."""


class CapctlError(Exception):
    """An expected failure: printed as one line, exit code attached."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


__all__ = ["EXIT_ERROR", "EXIT_OK", "EXIT_UNREACHABLE", "CapctlError"]
