"""Entry point of the node agent (``capacity-agent`` / ``python -m capacity_agent``).

Settings come from the environment (``CAPACITY_AGENT_*``, see
:class:`capacity_agent.settings.AgentSettings`); flags given on the command line override them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any

from lightkube import Client
from pydantic import ValidationError

from capacity_agent import cluster
from capacity_agent.agent import NodeAgent, run_agents
from capacity_agent.settings import BALLOT_INTERVAL, AgentSettings
from capacity_agent.voter import Voter, VoterNode
from capacity_agent.witness import Witness
from capacity_api import __version__
from capacity_api.cluster_access import EXIT_NO_CLUSTER

log = logging.getLogger("capacity_agent")
QUIET_LOGGERS = ("httpx2", "httpcore2")
"""lightkube's HTTP client logs every request at INFO (and every socket step at DEBUG): only its
warnings reach the agent's log, whose own lines say which writes failed and why."""


async def start_voter(agents: Sequence[NodeAgent], api: Client) -> None:
    """The voter for every hosted node (the runtime's ``voter_factory``)."""
    nodes = {
        agent.name: VoterNode(
            name=agent.name,
            measurements=agent.measurements,
            lease_renewed_at=agent.lease.last_renewed,
            lease_duration=float(agent.settings.lease_duration_seconds),
        )
        for agent in agents
    }
    namespace = agents[0].settings.lease_namespace if agents else "capacity-system"
    spacing = agents[0].settings.ballot_interval if agents else BALLOT_INTERVAL
    await Voter(api, nodes, namespace, ballot_interval=spacing).run()


async def start_witness(agents: Sequence[NodeAgent], api: Client, endpoint: str | None) -> None:
    """The witness of this process, reporting as its first hosted node (one vantage point).
    It starts once that node's CapacityNode exists: its report is written into the object's
    status, and before the first publish that write could only fail and be retried."""
    settings = agents[0].settings
    await agents[0].publisher.published.wait()
    await Witness(
        api,
        agents[0].name,
        [agent.name for agent in agents],
        settings.lease_namespace,
        endpoint=endpoint,
        interval=settings.witness_interval or settings.lease_renew_interval,
    ).run()


def parse_args(argv: Sequence[str] | None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="capacity-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add = parser.add_argument
    add("--node-name", help="the node measured (env CAPACITY_AGENT_NODE_NAME)")
    add("--substrates", help="comma-separated substrates to measure (default: all present)")
    add("--interval", type=float, help="seconds between samples (default 1)")
    add("--publish-interval", type=float, help="minimum seconds between writes (default 10)")
    add("--source", help="live | replay:FILE | synthetic:KIND | prometheus:URL (default live)")
    add("--prometheus-instance", help="node-exporter instance label for a prometheus: source")
    add("--simulate", type=int, help="run N simulated nodes named <node-name>-<i>")
    add(
        "--kubeconfig",
        help="kubeconfig file (default: $KUBECONFIG, in a pod its service account, "
        "else ~/.kube/config)",
    )
    add("--lease-namespace", help="namespace of the node Leases (default capacity-system)")
    add(
        "--lease-duration",
        type=int,
        dest="lease_duration_seconds",
        help="seconds a Lease stays valid without renewal (default 40)",
    )
    add("--lease-renew-interval", type=float, help="seconds between Lease renewals (default 10)")
    add(
        "--ballot-interval",
        type=float,
        help="seconds at least between two writes of a node's ballot (default 0.1)",
    )
    add("--health-port", type=int, help="port of /metrics and /healthz (0 disables)")
    add("--proc-root", help="the host's /proc as mounted (default /proc)")
    add("--sys-root", help="the host's /sys as mounted (default /sys)")
    add("--threads", type=int, help="worker threads for blocking calls")
    add("--advertise-address", help="address other agents probe /healthz at (default: none)")
    add("--no-witness", dest="witness", action="store_false", default=None, help="no witness")
    add("--no-vote", dest="vote", action="store_false", default=None, help="do not vote")
    add("--log-level", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    args = vars(parser.parse_args(argv))
    overrides = {key: value for key, value in args.items() if value is not None}
    if "substrates" in overrides:
        overrides["substrates"] = [s.strip() for s in overrides["substrates"].split(",") if s]
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    overrides = parse_args(argv)
    try:
        settings = AgentSettings(**overrides)
    except ValidationError as exc:
        print(f"capacity-agent: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        access = cluster.load(str(settings.kubeconfig) if settings.kubeconfig else None)
        cluster.check_reachable(access)
    except cluster.ClusterAccessError as exc:
        print(f"capacity-agent: {exc}", file=sys.stderr)
        return EXIT_NO_CLUSTER
    api = cluster.api_client(access, pool=settings.threads, timeout=settings.request_timeout)
    try:
        asyncio.run(
            run_agents(
                settings,
                api,
                voter_factory=start_voter if settings.vote else None,
                witness_factory=start_witness if settings.witness else None,
            )
        )
    except RuntimeError as exc:
        log.error("capacity-agent stopped: %s", exc, exc_info=exc.__cause__ is not None)
        return 1
    finally:
        api.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
