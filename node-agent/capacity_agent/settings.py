"""The agent's settings: one pydantic-settings object per process.

Every field can be set from the environment with the ``CAPACITY_AGENT_`` prefix (for example
``CAPACITY_AGENT_NODE_NAME``, which the DaemonSet fills from ``spec.nodeName`` through the downward
API, or ``CAPACITY_AGENT_SUBSTRATES='["host","storage"]'``); command-line flags override the
environment (:func:`capacity_agent.__main__.main` passes them as keyword arguments).
"""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from capacity_agent.collectors.sources import SourceSpec, parse_source
from capacity_api.models import NodeName, Substrate

ENV_PREFIX = "CAPACITY_AGENT_"
FIELD_MANAGER = "capacity-agent"
"""The server-side apply field manager of everything the agent writes."""
BALLOT_INTERVAL = 0.15
"""Default seconds at least between two writes of a node's ballot (``ballot_interval``): at
30 claims/s, 0.1 s had about 0.2 more requests per claim for about 0.02 s less p50
(docs/admission.md, "Choosing ``ballot_interval``")."""


class AgentSettings(BaseSettings):
    """Configuration of one agent process (one node, or ``simulate`` simulated nodes)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    node_name: NodeName
    """The Kubernetes node measured; the CapacityNode and the Lease are named after it."""
    substrates: list[Substrate] | None = None
    """Substrates to measure. None (default): every substrate present on the node. A substrate
    named here is measured even when its collector reports it absent at start, so a database that
    is down shows as Stale instead of silently disappearing."""
    interval: float = Field(default=1.0, gt=0)
    """Seconds between two samples of every substrate."""
    publish_interval: float = Field(default=10.0, ge=1.0)
    """Minimum seconds between two writes of the CapacityNode."""
    publish_tolerance: float = Field(default=0.02, ge=0.0, le=1.0)
    """Absolute change of a summary or gate value (in [0, 1] units) that is worth a write."""
    heartbeat_intervals: int = Field(default=2, ge=1)
    """Publish at least every this many publish intervals even when nothing changed, so that
    observedAt stays within the voters' maxAgeSeconds (30 s by default): 2 x 10 s."""
    stale_after: float | None = Field(default=None, gt=0)
    """Seconds without a sample after which a substrate is Stale; None: max(3 x interval, 3 s)."""
    source: str = "live"
    """live | replay:FILE | synthetic:KIND | prometheus:URL."""
    prometheus_instance: str | None = None
    """The node-exporter instance label to read with a prometheus: source (e.g. 10.0.0.7:9100)."""
    lease_namespace: str = "capacity-system"
    """Namespace of the per-node Leases (the platform namespace)."""
    lease_duration_seconds: int = Field(default=40, ge=1)
    """Lease.spec.leaseDurationSeconds: how long a renewal vouches for the node."""
    lease_renew_interval: float = Field(default=10.0, gt=0)
    """Seconds between two Lease renewals."""
    ballot_interval: float = Field(default=BALLOT_INTERVAL, ge=0.0, le=5.0)
    """Seconds at least between two writes of a node's ballot: the votes that come meanwhile go
    together (a witness votes on every proposal). 0: every vote at once."""
    proc_root: Path = Path("/proc")
    """The host's /proc as mounted in the agent's container."""
    sys_root: Path = Path("/sys")
    """The host's /sys as mounted in the agent's container."""
    cgroup_path: str | None = None
    """The cgroup whose limits bound the host substrate; None: the agent's own cgroup."""
    netns_pid: int | None = Field(default=None, ge=1)
    """Read /proc/<pid>/net/dev (1: the host's network namespace from a pod without
    hostNetwork); None reads <proc>/net/dev."""
    kubeconfig: Path | None = None
    """Kubeconfig file (``--kubeconfig``); None: ``$KUBECONFIG``, else in-cluster, else
    ``~/.kube/config`` (:mod:`capacity_api.cluster_access`)."""
    health_port: int = Field(default=8080, ge=0, le=65535)
    """Port of /metrics and /healthz; 0 disables the server."""
    health_address: str = "0.0.0.0"  # noqa: S104 - probes and Prometheus reach the pod IP
    """Address the metrics and health server binds."""
    advertise_address: str | None = None
    """The address other agents reach this one's health server at (the chart passes the pod
    IP); it is published in ``status.witness.endpoint`` for their probes. None: not published,
    so witnesses judge this node by its Lease alone."""
    witness: bool = True
    """Report, as a witness, on the nodes whose Leases expired (DESIGN section 6)."""
    witness_interval: float | None = Field(default=None, gt=0)
    """Seconds between two witness passes; None: the lease renew interval."""
    simulate: int = Field(default=0, ge=0)
    """Run this many simulated agents in one process, named <node_name>-<i> (0: one real agent)."""
    threads: int = Field(default=8, ge=1)
    """Worker threads for blocking calls (Kubernetes API, collectors)."""
    request_timeout: float = Field(default=10.0, gt=0)
    """Seconds an API request may take before it is abandoned and retried."""
    vote: bool = True
    """Run the voter (quorum admission) for the hosted nodes."""
    log_level: str = "INFO"

    @field_validator("source")
    @classmethod
    def _valid_source(cls, value: str) -> str:
        parse_source(value)
        return value

    @field_validator("substrates")
    @classmethod
    def _unique_substrates(cls, value: list[Substrate] | None) -> list[Substrate] | None:
        if value is None:
            return None
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _renew_within_duration(self) -> Self:
        if self.lease_renew_interval >= self.lease_duration_seconds:
            raise ValueError(
                f"lease_renew_interval ({self.lease_renew_interval:g} s) must be shorter than "
                f"lease_duration_seconds ({self.lease_duration_seconds} s)"
            )
        return self

    @property
    def source_spec(self) -> SourceSpec:
        return parse_source(self.source)

    @property
    def stale_seconds(self) -> float:
        """Seconds without a sample after which a substrate is Stale."""
        if self.stale_after is not None:
            return self.stale_after
        return max(3.0 * self.interval, 3.0)

    def node_names(self) -> list[str]:
        """The nodes this process hosts: the node itself, or <node_name>-<i> when simulating."""
        if self.simulate == 0:
            return [self.node_name]
        return [f"{self.node_name}-{i}" for i in range(self.simulate)]
