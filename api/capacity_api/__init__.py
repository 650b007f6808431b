"""Shared, I/O-free core of Capacity Platform: CRD models, quantities and gate math."""

from importlib.metadata import PackageNotFoundError, version

GROUP = "capacity.platform.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

try:
    __version__ = version("capacity-platform")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["API_VERSION", "GROUP", "VERSION", "__version__"]
