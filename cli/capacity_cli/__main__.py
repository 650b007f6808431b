"""``capctl`` / ``python -m capacity_cli``."""

from __future__ import annotations

import sys

from capacity_cli.main import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
