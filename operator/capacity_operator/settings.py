"""Operator settings: one pydantic-settings object per process (env prefix CAPACITY_OPERATOR_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from capacity_api.models import MAX_BALLOT_VOTES


class OperatorSettings(BaseSettings):
    """Every knob of the operator; flags of ``capacity-operator`` override the environment."""

    model_config = SettingsConfigDict(env_prefix="CAPACITY_OPERATOR_", extra="ignore")

    namespace: str = "capacity-system"
    """Platform namespace: node Leases and the calibration ConfigMap live here."""
    kubeconfig: str | None = None
    """Kubeconfig file (``--kubeconfig``); unset: ``$KUBECONFIG``, else in-cluster, else
    ``~/.kube/config`` (:mod:`capacity_api.cluster_access`)."""
    vote_timeout_seconds: float = Field(default=10.0, gt=0)
    """How long voters have to answer a proposal before the epoch is aborted."""
    witness_attestation_seconds: float = Field(default=5.0, ge=0, le=60)
    """A witness's attestation that the placement nodes are alive counts as its YES when it is
    at most this old at the proposal (its ballot's ``alive``, one write for every proposal
    within the time instead of one vote each); 0: witnesses vote on each proposal."""
    max_attempts: int = Field(default=5, ge=1, le=50)
    """Proposals tried for one admission before the claim is Rejected."""
    max_open_proposals: int = Field(default=64, ge=1, le=MAX_BALLOT_VOTES // 2)
    """Epochs open at once (flow control): more Pending claims wait, unwritten, in creation
    order until an epoch ends, instead of all proposing and missing their deadlines. At most
    half of what a ballot holds: a witness votes on every open epoch, and keeps a vote until
    its claim's next event."""
    ledger_gc_seconds: float = Field(default=60.0, gt=0)
    """How often the ledger looks for claims deleted without an event reaching the operator
    (one list of the claims)."""
    ledger_report_seconds: float = Field(default=10.0, gt=0)
    """The ledger's report in a node's ``status.allocated`` is written soon after a quiet
    spell (``ledger_report_gather_seconds``), then at most this often per node however many
    commits land there."""
    ledger_report_gather_seconds: float = Field(default=1.0, ge=0)
    """A node's report waits this long after the first change it carries, so that the
    commits of a busy moment on the node go in one write (0: at once)."""
    peering: str = "capacity-platform"
    """kopf peering name; a second operator copy with the same name stays idle."""
    standalone: bool = False
    """Run without peering (tests and local experiments only)."""
    priority: int | None = None
    """kopf peering priority of this copy. Unset: a random one, so that of two accidental copies
    exactly one acts (kopf pauses every copy when the highest priority is shared)."""
    peering_lifetime_seconds: int = Field(default=15, ge=5)
    """How long a copy that died without saying goodbye (SIGKILL) blocks the others."""
    claim_namespaces: list[str] = Field(default_factory=list)
    """Serve claims of these namespaces only (empty: every namespace)."""
    threads: int = Field(default=16, ge=1, le=256)
    """Admission steps run at once, the connections the operator keeps to the API server for
    their requests, and kopf's worker threads."""
    commit_retries: int = Field(default=20, ge=1)
    """Compare-and-swap retries on a conflicting write before giving up for this event."""
    health_port: int = Field(default=0, ge=0, le=65535)
    """Port of kopf's liveness endpoint ``/healthz`` on all addresses (0: none). The chart sets
    it for the liveness probe; there is no readiness endpoint (kopf's advice)."""
    failure_grace_seconds: float = Field(default=10.0, ge=0)
    """Seconds a node's Lease stays expired (Suspect) before the node is Failed, fenced, and its
    claims recovered, when too few witnesses confirm it and none sees it alive: the hard grace
    period of DESIGN section 6."""
    witness_quorum: int = Field(default=2, ge=0)
    """Alive witness agents that must report a suspect node not alive for it to be Failed at
    once, before the grace period (0: the grace period only)."""
    partition_fraction: float = Field(default=0.5, gt=0, le=1)
    """More than this share of the nodes expiring at once is a partition: nothing moves."""
    recoveries_per_minute: float = Field(default=60.0, gt=0)
    """Rate of claim recoveries started (token bucket refill)."""
    recovery_burst: int = Field(default=10, ge=1)
    """Recoveries that may start at once."""
    recovery_wait_seconds: float = Field(default=300.0, gt=0)
    """How long a recovering claim waits for a node with room before it is Failed."""
    lifecycle_interval_seconds: float = Field(default=1.0, gt=0)
    """Seconds between two passes of the node lifecycle."""
    truth_observation_seconds: float = Field(default=600.0, gt=0)
    """How long every decision is checked against what happens afterwards: an admitted claim's
    pods and placement nodes, a rejected claim's candidate nodes (DESIGN section 7)."""
    truth_interval_seconds: float = Field(default=5.0, gt=0)
    """How often each open check looks at its claim's pods and nodes (an OOM kill is seen at
    most this late)."""
    truth_restart_limit: int = Field(default=3, ge=1)
    """Restarts after SIGKILL (exit code 137, no OOM reason) of one container that falsify an
    admission."""
    calibration_interval_seconds: float = Field(default=30.0, gt=0)
    """Seconds between two calibration rounds (DESIGN section 7, docs/calibration.md)."""
    calibration_min_outcomes: int = Field(default=20, ge=1)
    """Final outcomes a threshold needs before calibration moves it."""
    calibration_window: int = Field(default=200, ge=1, le=100_000)
    """The newest final outcomes a calibration round looks at."""
    calibration_max_step: float = Field(default=0.1, gt=0, le=1)
    """Largest move of a threshold per round, as a share of the width of its bounds."""
    calibration_weight_falsified: float = Field(default=1.0, ge=0)
    """Cost of a falsified admission in calibration's objective."""
    calibration_weight_missed: float = Field(default=0.5, ge=0)
    """Cost of a missed opportunity in calibration's objective."""
    calibration_min_gain: float = Field(default=0.2, ge=0, lt=1)
    """Share of the current cost a threshold move must save at least."""
    calibration_history_limit: int = Field(default=50, ge=1, le=1000)
    """Entries of the calibration history kept in the ConfigMap."""
    store_path: str | None = None
    """SQLite file of the outcome store; unset: ``$XDG_STATE_HOME`` (or ``~/.local/state``)
    ``/capacity-platform/operator/outcomes.db``. The chart puts it on the operator's volume."""
    store_dsn: str | None = None
    """PostgreSQL DSN of the outcome store (``postgresql://user:password@host:port/db``); when
    set, used instead of the SQLite file. The chart takes it from a Secret."""
