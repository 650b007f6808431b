"""``capctl``: explain claims and nodes from the command line (DESIGN section 2).

``capctl explain CLAIM`` prints a claim's proposal, each vote with its gate readings against the
thresholds, and one sentence saying why the claim is where it is. ``capctl nodes`` prints each
node's lease, headroom, allocation and gate readings. ``-o json`` prints the same facts as JSON.

A user tool: it depends on :mod:`capacity_api` and the Kubernetes client, never on the operator or
the agent (an import-linter contract checks it). The modules keep I/O thin:

- :mod:`capacity_cli.main`: argument parsing, dispatch, exit codes;
- :mod:`capacity_cli.cluster`: finding the cluster as kubectl does and reading claims, the
  voters' CapacityBallots (the live votes of an open proposal), events, CapacityNodes, Leases
  and the calibration ConfigMap into parsed models;
- :mod:`capacity_cli.explain`, :mod:`capacity_cli.why`, :mod:`capacity_cli.nodes`: pure renderers
  that take the clock as a parameter, so they are unit-tested without a cluster;
- :mod:`capacity_cli.output`: tables, durations, numbers and JSON output.

Vote counts come from :func:`capacity_api.admission.tally` and the gates from
:mod:`capacity_api.gate_table`, so they match the operator's and the agents'. The renderers and
the parser are re-exported here.
"""

from capacity_cli.explain import (
    Calibration,
    EventInfo,
    Explanation,
    GateCheck,
    VoteRow,
    ballot_voters,
    explain,
    explain_json,
    explain_text,
    explanation_json,
    explanation_text,
    gate_checks,
    proposal_open,
    recent_events,
    vote_rows,
    votes_in_ballots,
    with_ballot_votes,
)
from capacity_cli.main import build_parser, main
from capacity_cli.nodes import NODE_HEADERS, lease_json, node_json, nodes_json, nodes_text
from capacity_cli.output import human_duration, table
from capacity_cli.why import why

__all__ = [
    "NODE_HEADERS",
    "Calibration",
    "EventInfo",
    "Explanation",
    "GateCheck",
    "VoteRow",
    "ballot_voters",
    "build_parser",
    "explain",
    "explain_json",
    "explain_text",
    "explanation_json",
    "explanation_text",
    "gate_checks",
    "human_duration",
    "lease_json",
    "main",
    "node_json",
    "nodes_json",
    "nodes_text",
    "proposal_open",
    "recent_events",
    "table",
    "vote_rows",
    "votes_in_ballots",
    "why",
    "with_ballot_votes",
]
