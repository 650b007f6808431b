"""Entry point of the operator (``capacity-operator`` / ``python -m capacity_operator``)."""

from __future__ import annotations

import argparse
import logging
import secrets
import sys

import kopf

from capacity_api import __version__
from capacity_api.cluster_access import EXIT_NO_CLUSTER
from capacity_operator import cluster
from capacity_operator.settings import OperatorSettings


def parse_args(argv: list[str] | None) -> OperatorSettings:
    parser = argparse.ArgumentParser(prog="capacity-operator", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--kubeconfig",
        help="kubeconfig file (default: $KUBECONFIG, in a pod its service account, "
        "else ~/.kube/config)",
    )
    parser.add_argument("--namespace", help="platform namespace (leases, calibration)")
    parser.add_argument("--vote-timeout", type=float, dest="vote_timeout_seconds")
    parser.add_argument(
        "--witness-attestation",
        type=float,
        dest="witness_attestation_seconds",
        help="seconds a witness's attestation of the placement nodes counts as its YES "
        "(0: witnesses vote on each proposal)",
    )
    parser.add_argument("--max-attempts", type=int)
    parser.add_argument(
        "--max-open-proposals",
        type=int,
        help="epochs open at once; more Pending claims wait in creation order (flow control)",
    )
    parser.add_argument(
        "--standalone",
        action="store_true",
        default=None,
        help="run without peering (never in production)",
    )
    parser.add_argument("--priority", type=int, help="kopf peering priority")
    parser.add_argument("--peering", help="kopf peering name")
    parser.add_argument("--threads", type=int)
    parser.add_argument(
        "--claim-namespace",
        action="append",
        dest="claim_namespaces",
        help="serve claims of this namespace only (repeatable; default: all namespaces)",
    )
    parser.add_argument(
        "--health-port", type=int, help="port of the liveness endpoint /healthz (0: none)"
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k != "verbose"}
    settings = OperatorSettings(**overrides)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not args.verbose:
        # kopf logs every handler run per object at INFO: at tens of claims per second that
        # drowns the operator's own messages (admissions, rebuilds, peering)
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        # one access line per liveness probe (every 10 s) says nothing
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return settings


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    try:
        cluster.check_reachable(cluster.load(settings.kubeconfig))
    except cluster.ClusterAccessError as exc:
        print(f"capacity-operator: {exc}", file=sys.stderr)
        return EXIT_NO_CLUSTER
    import capacity_operator.handlers  # noqa: F401, PLC0415 - registers the handlers with kopf

    priority = settings.priority
    if priority is None:
        priority = secrets.randbelow(1_000_000) + 1
    logging.getLogger("capacity_operator").info(
        "peering %r with priority %d%s",
        settings.peering,
        priority,
        " (standalone: peering off)" if settings.standalone else "",
    )
    scoped = bool(settings.claim_namespaces)
    kopf.run(
        clusterwide=not scoped,
        namespaces=[*settings.claim_namespaces, settings.namespace] if scoped else (),
        standalone=settings.standalone,
        priority=priority,
        peering_name=settings.peering,
        memo=kopf.Memo(settings=settings, priority=priority),
        liveness_endpoint=(
            f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
