"""Entry point of the operator (``capacity-operator`` / ``python -m capacity_operator``)."""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("capacity_operator")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="capacity-operator", description=__doc__)
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log.info("capacity-operator: admission is not implemented yet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
