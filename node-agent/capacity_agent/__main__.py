"""Entry point of the node agent (``capacity-agent`` / ``python -m capacity_agent``)."""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("capacity_agent")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="capacity-agent", description=__doc__)
    parser.add_argument("--node-name", required=True, help="the node this agent measures")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log.info("capacity-agent for node %s: measurement is not implemented yet", args.node_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
