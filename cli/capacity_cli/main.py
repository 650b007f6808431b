"""capctl's command line: argument parsing, dispatch to the readers and renderers, exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NoReturn

import urllib3
from kubernetes import client

from capacity_api import __version__
from capacity_api.calibration import CALIBRATED
from capacity_api.gates import CONFIGMAP_KEYS
from capacity_cli.calibration import (
    calibration_json,
    calibration_text,
    change_state,
    do_pin,
    do_rollback,
    read_state,
)
from capacity_cli.cluster import (
    PLATFORM_NAMESPACE,
    load_client,
    read_ballots,
    read_calibration,
    read_claim,
    read_events,
    read_leases,
    read_nodes,
    unreachable,
)
from capacity_cli.errors import EXIT_OK, CapctlError
from capacity_cli.explain import (
    ballot_voters,
    explain,
    explanation_json,
    explanation_text,
    votes_in_ballots,
)
from capacity_cli.nodes import nodes_json, nodes_text
from capacity_cli.output import emit


def _common(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The global flags; on subcommands with SUPPRESS defaults, so they work on either side."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--kubeconfig",
        default=default(None),
        help="kubeconfig file (default: $KUBECONFIG, in a pod its service account, "
        "else ~/.kube/config)",
    )
    parser.add_argument(
        "-n",
        "--namespace",
        default=default(None),
        help="namespace of the claim (default: the context's namespace, else 'default')",
    )
    parser.add_argument(
        "--platform-namespace",
        default=default(PLATFORM_NAMESPACE),
        help="namespace of the calibration ConfigMap and the node Leases "
        f"(default: {PLATFORM_NAMESPACE})",
    )
    parser.add_argument(
        "-o",
        "--output",
        choices=("text", "json"),
        default=default("text"),
        help="output format (default: text)",
    )


def build_parser() -> argparse.ArgumentParser:
    """capctl's command line: ``explain CLAIM``, ``nodes`` and ``calibration``, global flags on
    either side."""
    parser = argparse.ArgumentParser(
        prog="capctl", description="Explain Capacity Platform claims and nodes."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    explain_cmd = sub.add_parser(
        "explain",
        help="why a claim is where it is: proposal, votes, gate readings, events",
        description="Explain a CapacityClaim: its proposal, each vote with its gate readings "
        "against the thresholds, refusals, placements, conditions and recent events.",
    )
    explain_cmd.add_argument("claim", metavar="CLAIM", help="name of the CapacityClaim")
    _common(explain_cmd, suppress=True)
    nodes_cmd = sub.add_parser(
        "nodes",
        help="each node's lease, headroom, allocation and gate readings",
        description="List CapacityNodes with their Ready and Stale conditions, lease age and, per "
        "substrate, p95 load, headroom, allocation and gate readings.",
    )
    _common(nodes_cmd, suppress=True)
    cal = sub.add_parser(
        "calibration",
        help="the thresholds, their history and the falsification and miss rates",
        description="Show the calibration ConfigMap: each threshold with its bounds and whether "
        "it is pinned, the falsification and miss rates per substrate, and the history of "
        "every change. 'pin' and 'unpin' stop and resume automatic moves of thresholds; "
        "'rollback ID' sets the thresholds back to what they were right after history entry "
        "ID (0: before every entry kept).",
    )
    _common(cal, suppress=True)
    actions = cal.add_subparsers(dest="action", metavar="ACTION")
    show = actions.add_parser("show", help="the thresholds, rates and history (the default)")
    _common(show, suppress=True)
    keys = ", ".join(CONFIGMAP_KEYS[n] for n in CALIBRATED)
    for action, verb in (("pin", "stop"), ("unpin", "resume")):
        cmd = actions.add_parser(action, help=f"{verb} automatic moves of thresholds ({keys})")
        cmd.add_argument("keys", nargs="+", metavar="KEY", help=f"one of {keys}")
        _common(cmd, suppress=True)
    back = actions.add_parser("rollback", help="thresholds as they were after a history entry")
    back.add_argument("entry", type=int, metavar="ID", help="history entry (0: before all)")
    _common(back, suppress=True)
    return parser


def _run(args: argparse.Namespace, now: Callable[[], datetime]) -> int:
    api, context_namespace = load_client(args.kubeconfig)
    try:
        return _command(api, context_namespace, args, now)
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):
            raise
        raise unreachable(api, exc) from exc
    finally:
        api.close()


def _command(
    api: client.ApiClient,
    context_namespace: str | None,
    args: argparse.Namespace,
    now: Callable[[], datetime],
) -> int:
    if args.command == "explain":
        namespace = args.namespace or context_namespace or "default"
        claim = read_claim(api, namespace, args.claim)
        # while its proposal is open, the votes are in the voters' ballots, not in the claim
        voters = ballot_voters(claim)
        ballots = read_ballots(api, voters) if voters else None
        votes = votes_in_ballots(claim, ballots) if ballots is not None else None
        calibration = read_calibration(api, args.platform_namespace)
        events = read_events(api, claim)
        e = explain(claim, calibration, events, now=now(), ballot_votes=votes)
        emit(args.output, explanation_json(e), explanation_text(e))
    elif args.command == "calibration":
        action = getattr(args, "action", None) or "show"
        at = now()
        if action == "show":
            state, _, _ = read_state(api, args.platform_namespace)
        elif action in ("pin", "unpin"):
            state = change_state(
                api, args.platform_namespace, do_pin(args.keys, pinned=action == "pin")
            )
        else:
            state = change_state(api, args.platform_namespace, do_rollback(args.entry, at))
        emit(args.output, calibration_json(state), calibration_text(state, now=at))
    else:
        nodes = read_nodes(api)
        leases = read_leases(api, args.platform_namespace)
        at = now()
        emit(args.output, nodes_json(nodes, leases, now=at), nodes_text(nodes, leases, now=at))
    return EXIT_OK


def _fail(message: str, code: int) -> NoReturn:
    print(f"capctl: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    """Run capctl; the exit code is :data:`~capacity_cli.errors.EXIT_OK`, ``EXIT_ERROR`` (1: a
    missing object, a refused request) or ``EXIT_UNREACHABLE`` (2: no cluster configured, or it
    cannot be reached), with one line on stderr for either failure."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    try:
        return _run(args, lambda: datetime.now(UTC))
    except CapctlError as exc:
        _fail(str(exc), exc.code)
    except BrokenPipeError:  # `capctl ... | head`
        return EXIT_OK


__all__ = ["build_parser", "main"]
