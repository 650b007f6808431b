"""Pydantic models of the CapacityNode and CapacityClaim custom resources.

These models are the single source of truth for the CRDs: ``capacity_api.crdgen`` turns them into
``crds/*.yaml`` (attribute docstrings become schema descriptions), and the agent and operator parse
and build objects with them. Field names are camelCase on the wire, snake_case in Python.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from capacity_api import API_VERSION
from capacity_api.quantity import Quantity

# Kubernetes object names: DNS-1123 subdomain.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
NodeName = Annotated[str, Field(min_length=1, max_length=253, pattern=NAME_PATTERN)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
MAX_VOTERS = 32
"""Upper bound on replicas + witnesses of one claim (voters of one proposal)."""
MAX_AHEAD = 8
"""Upper bound on the nodes a proposal names for attesting ahead (``Proposal.ahead``)."""
ATOMIC_MAP: dict[str, Any] = {"x-kubernetes-map-type": "atomic"}
ATOMIC_LIST: dict[str, Any] = {"x-kubernetes-list-type": "atomic"}
"""Schema markers of a field one writer replaces as a whole (see :class:`CapacityClaimStatus`):
the API server tracks it in ``managedFields`` as one field, not one per key and member, which
makes each write of it cheaper (docs/admission.md, "Atomic status fields")."""


class Model(BaseModel):
    """Base of every wire model: camelCase aliases, docstrings as descriptions."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
        extra="ignore",
    )

    def wire(self) -> dict[str, Any]:
        """The JSON-ready dict as the API server stores it (aliases, no unset optionals)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# ---------------------------------------------------------------------------------------------
# Enumerations


class Substrate(StrEnum):
    """A measured kind of capacity on a node."""

    HOST = "host"
    GPU = "gpu"
    STORAGE = "storage"
    NETWORK = "network"
    DATABASE = "database"
    THERMAL = "thermal"


class ClaimSubstrate(StrEnum):
    """The substrate a claim asks for; ``auto`` derives it from the requested resources."""

    HOST = "host"
    GPU = "gpu"
    STORAGE = "storage"
    NETWORK = "network"
    DATABASE = "database"
    AUTO = "auto"


class Phase(StrEnum):
    """Lifecycle phase of a CapacityClaim."""

    PENDING = "Pending"
    VOTING = "Voting"
    ADMITTED = "Admitted"
    REJECTED = "Rejected"
    RECOVERING = "Recovering"
    FAILED = "Failed"
    RELEASED = "Released"


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class VoteValue(StrEnum):
    YES = "YES"
    NO = "NO"


class VoterRole(StrEnum):
    PLACEMENT = "placement"
    WITNESS = "witness"


class RecoveryPolicy(StrEnum):
    REPLACE = "Replace"
    NONE = "None"


class SelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


# ---------------------------------------------------------------------------------------------
# Shared pieces


class Condition(Model):
    """A condition in the shape every Kubernetes API uses (metav1.Condition)."""

    model_config = ConfigDict(json_schema_extra={"required": ["type", "status"]})

    type: str = Field(min_length=1, max_length=316)
    """Type of the condition, e.g. Ready or Admitted."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: str | None = Field(default=None, max_length=1024)
    """A CamelCase reason for the last transition, one of the constants in capacity_api.reasons."""
    message: str | None = Field(default=None, max_length=32768)
    """A human-readable explanation of the last transition."""
    last_transition_time: datetime | None = None
    """When the status last changed."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation the condition was computed from."""


class LabelSelectorRequirement(Model):
    """One requirement of a label selector."""

    key: str = Field(min_length=1, max_length=317)
    """The label key the requirement applies to."""
    operator: SelectorOperator
    """How the key relates to the values."""
    values: list[Annotated[str, Field(max_length=63)]] | None = Field(default=None, max_length=64)
    """Values for In and NotIn; must be empty for Exists and DoesNotExist."""


class LabelSelector(Model):
    """Selects the pods that consume a claim (metav1.LabelSelector)."""

    match_labels: dict[str, Annotated[str, Field(max_length=63)]] | None = None
    """Labels a pod must carry, all of them."""
    match_expressions: list[LabelSelectorRequirement] | None = Field(default=None, max_length=16)
    """Set-based requirements, all of which must hold."""


# ---------------------------------------------------------------------------------------------
# CapacityClaim


class ClaimResources(Model):
    """Requested amounts as Kubernetes quantities; at least one must be given."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1})

    cpu: Quantity | None = None
    """Logical CPUs, e.g. "500m" or 2."""
    memory: Quantity | None = None
    """Memory in bytes, e.g. "4Gi"."""
    nvidia_gpu: Quantity | None = Field(default=None, alias="nvidia.com/gpu")
    """Whole GPUs."""
    storage_iops: Quantity | None = Field(default=None, alias="storage-iops")
    """Sustained storage operations per second."""
    network_bandwidth: Quantity | None = Field(default=None, alias="network-bandwidth")
    """Network bandwidth in bytes per second."""
    db_connections: Quantity | None = Field(default=None, alias="db-connections")
    """Database pool connections."""


class RecoverySpec(Model):
    """What happens to the claim when a node it is placed on fails."""

    policy: RecoveryPolicy = RecoveryPolicy.REPLACE
    """Replace re-admits the lost part on healthy nodes; None marks the claim Failed."""
    max_recoveries: int = Field(default=3, ge=0, le=100)
    """How many recoveries are attempted before the claim is Failed."""


class CapacityClaimSpec(Model):
    """What a workload asks for before it runs."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.resources) != (has(self.cGeo) || has(self.cInt))",
                    "message": "exactly one of spec.resources or spec.cGeo/spec.cInt must be set",
                    "reason": "FieldValueInvalid",
                },
                {
                    "rule": "!has(self.witnesses) || self.replicas + self.witnesses <= "
                    f"{MAX_VOTERS}",
                    "message": (
                        f"spec.replicas + spec.witnesses must not exceed {MAX_VOTERS} voters"
                    ),
                    "fieldPath": ".witnesses",
                    "reason": "FieldValueInvalid",
                },
            ]
        }
    )

    resources: ClaimResources | None = None
    """Requested amounts as Kubernetes quantities. Exclusive with cGeo/cInt."""
    c_geo: Fraction | None = Field(default=None, alias="cGeo")
    """Geometric share in [0,1] of one node's substrate: things held (cores, memory,
    GPUs, connections)."""
    c_int: Fraction | None = Field(default=None, alias="cInt")
    """Integration share in [0,1] of one node's substrate: things consumed per unit time
    (bandwidth, IOPS)."""
    substrate: ClaimSubstrate = ClaimSubstrate.AUTO
    """The substrate the claim is judged on; auto derives it from the requested resources."""
    replicas: int = Field(default=1, ge=1, le=MAX_VOTERS)
    """How many nodes the workload spans; each placement node holds the full request."""
    witnesses: int | None = Field(default=None, ge=0, le=MAX_VOTERS)
    """Extra voters besides the placement nodes. Unset means enough for at least 3 voters where
    the cluster has that many nodes."""
    workload_selector: LabelSelector | None = None
    """The pods that consume this claim."""
    recovery: RecoverySpec | None = None
    """Recovery behaviour when a placement node fails (default: Replace, 3 recoveries)."""


ASKED_SLOTS = ("first", "second", "third")
"""The voters a proposal names one field each in ``status.proposal.asked``."""
ASKED_PATH = "status.proposal.asked"
"""Where :class:`Asked` sits in a claim: its fields are the claim's selectable fields."""
ASKED_FIELDS = (*ASKED_SLOTS, "more")
"""Every selectable field of :class:`Asked`, one claims watch each for an agent of one node."""


class Asked(Model):
    """A proposal's voters, one field each, for the API server's field selectors.

    A field selector matches one value of one field, and a list is not selectable, so the
    voters are copied out of ``voters`` into fields an agent hosting one node can watch
    (``status.proposal.asked.first=<node>``, one watch per field): it then sees only the claims
    whose proposal names its node. A proposal with more voters than fields sets only ``more``,
    and every such agent watches ``status.proposal.asked.more=true`` as well.
    """

    first: NodeName | None = None
    """The first voter (the first placement node)."""
    second: NodeName | None = None
    """The second voter."""
    third: NodeName | None = None
    """The third voter."""
    more: bool | None = None
    """True when the proposal names more voters than there are fields: every agent looks."""

    @classmethod
    def of(cls, voters: list[str]) -> Asked:
        if len(voters) > len(ASKED_SLOTS):
            return cls(more=True)
        return cls(**dict(zip(ASKED_SLOTS, voters, strict=False)))


class Proposal(Model):
    """One epoch of the two-phase admission protocol."""

    epoch: int = Field(ge=1)
    """Monotonic epoch; votes carrying another epoch never count."""
    placement: list[NodeName] = Field(max_length=MAX_VOTERS)
    """Nodes the workload would run on."""
    voters: list[NodeName] = Field(max_length=MAX_VOTERS)
    """Every node asked to vote: the placement nodes and the witnesses."""
    deadline: datetime
    """Votes arriving after this time do not count; the epoch is aborted."""
    share: Fraction | None = None
    """The requested fraction of each placement node's substrate."""
    substrate: Substrate | None = None
    """The substrate the proposal is judged on."""
    committed: dict[str, Fraction] | None = Field(default=None, max_length=MAX_VOTERS)
    """Per placement node, the share of the substrate committed to admitted claims when the
    proposal was made (the operator's ledger): the node counts it (or what it has seen admitted
    on itself, when more) with its own open promises; the commit is checked again against the
    operator's ledger."""
    holding: list[NodeName] | None = Field(default=None, max_length=MAX_VOTERS)
    """Nodes the claim holds a share of that this epoch does not ask to vote (a recovery's
    surviving placement nodes): named in ``asked`` too, so that their agents keep hearing the
    claim and keep counting its share."""
    asked: Asked | None = None
    """The voters (then the holding nodes) again, one field each, so that an agent can watch
    only the claims that name its node; always derived from them."""
    attested_since: datetime | None = None
    """A witness may answer with its ballot's ``alive`` attestations instead of a vote: one
    that says every placement node was alive at or after this time counts as its YES for this
    epoch (docs/admission.md, "Witness attestations"). Set by the operator a few seconds
    before the proposal was made (its ``witness_attestation_seconds``); None: witnesses vote
    on the proposal itself, as a placement node does."""
    ahead: list[NodeName] | None = Field(default=None, max_length=MAX_AHEAD)
    """The nodes the operator would place its next claims on once the placement nodes are
    full, in that order: a witness that writes attestations for this proposal attests those
    it sees alive among them too, so that the next proposals find them attested and cost it
    no write (docs/admission.md, "Attesting ahead"). Nobody votes on them; set only with
    ``attestedSince``."""

    @model_validator(mode="after")
    def _derive_asked(self) -> Proposal:
        self.asked = Asked.of(list(dict.fromkeys([*self.voters, *(self.holding or [])])))
        return self


class Vote(Model):
    """One node's vote on a proposal."""

    vote: VoteValue
    """YES or NO."""
    role: VoterRole
    """placement nodes vote on fit, witnesses on whether the placement nodes are alive."""
    epoch: int = Field(ge=1)
    """The proposal epoch this vote is for."""
    reason: str | None = Field(default=None, max_length=1024)
    """Why, naming the failing gate for a NO."""
    gate: str | None = Field(default=None, max_length=32)
    """A placement node's NO: the first gate that failed (samples, freshness, capacity, fit,
    isolation, gluing, burst, pressure); calibration reads it."""
    readings: dict[str, float] | None = None
    """The gate readings the vote was decided on."""
    time: datetime | None = None
    """When the vote was cast."""


class Placement(Model):
    """Where an admitted claim holds capacity."""

    node: NodeName
    """The node holding the share."""
    substrate: Substrate
    """The substrate the share is taken from."""
    share: Fraction
    """Fraction of the node's substrate allocated to this claim."""
    epoch: int | None = Field(default=None, ge=1)
    """The epoch that committed this placement."""


class Recovery(Model):
    """One move of a claim's share away from a failed node."""

    from_node: NodeName = Field(alias="from")
    """The failed node."""
    to_node: NodeName | None = Field(default=None, alias="to")
    """The node that took the share over, if any."""
    at: datetime
    """When the recovery committed."""
    reason: str = Field(max_length=1024)
    """Why the share was moved."""
    epoch: int | None = Field(default=None, ge=1)
    """The admission epoch of the recovery."""


class Verdict(StrEnum):
    """What really happened to an admission or a rejection (DESIGN section 7)."""

    OBSERVING = "Observing"
    CONFIRMED = "Confirmed"
    FALSIFIED = "Falsified"
    MISSED_OPPORTUNITY = "MissedOpportunity"
    RIGHTLY_REJECTED = "RightlyRejected"


class Evidence(Model):
    """One thing seen that falsifies an admission."""

    kind: str = Field(max_length=64)
    """OOMKilled, Evicted, RepeatedRestarts or NodePressure."""
    node: NodeName | None = None
    """The node it happened on."""
    pod: str | None = Field(default=None, max_length=253)
    """The pod (for pod evidence)."""
    container: str | None = Field(default=None, max_length=253)
    """The container (for OOMKilled and RepeatedRestarts)."""
    reason: str = Field(max_length=1024)
    """The Kubernetes reason or the node condition (e.g. OOMKilled, MemoryPressure)."""
    message: str | None = Field(default=None, max_length=1024)
    """What it said."""
    time: datetime | None = None
    """When it happened (or was first seen)."""


class Truth(Model):
    """The check of one decision against what happened afterwards, written by the operator."""

    decision: Phase
    """The decision checked: Admitted or Rejected."""
    verdict: Verdict
    """Observing until the period ends; then Confirmed or Falsified (admitted), MissedOpportunity
    or RightlyRejected (rejected). Falsified may come at any time of the period."""
    since: datetime
    """When the observation began (the admission or the rejection)."""
    until: datetime
    """When it ends."""
    decided_at: datetime | None = None
    """When the verdict became final."""
    evidence: list[Evidence] | None = Field(default=None, max_length=8)
    """What falsified the admission (at most 8 items)."""
    headroom: dict[str, float] | None = None
    """Rejected claims: the lowest headroom each candidate node showed so far during the period,
    for the claim's substrate."""


class CapacityClaimStatus(Model):
    """Observed state of a claim, written by the operator only (the agents vote in their
    ballots). Its structured fields are atomic for server-side apply: one writer, and each
    write replaces them whole, so ``managedFields`` need not track their keys."""

    phase: Phase | None = None
    """Pending, Voting, Admitted, Rejected, Recovering, Failed or Released."""
    reason: str | None = Field(default=None, max_length=1024)
    """Short CamelCase reason of the current phase."""
    message: str | None = Field(default=None, max_length=32768)
    """Why the claim is in its phase, in one sentence."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation the status reflects."""
    proposal: Proposal | None = Field(default=None, json_schema_extra=ATOMIC_MAP)
    """The open (or last) proposal."""
    votes: dict[str, Vote] | None = Field(default=None, json_schema_extra=ATOMIC_MAP)
    """Votes of the current epoch, keyed by node name."""
    placements: list[Placement] | None = Field(
        default=None, max_length=MAX_VOTERS, json_schema_extra=ATOMIC_LIST
    )
    """Committed placements; the allocation ledger is derived from these."""
    recoveries: list[Recovery] | None = Field(
        default=None, max_length=100, json_schema_extra=ATOMIC_LIST
    )
    """Every recovery of this claim."""
    attempts: int | None = Field(default=None, ge=0)
    """Proposals tried for the current admission."""
    refusals: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(
        default=None, json_schema_extra=ATOMIC_MAP
    )
    """Nodes that refused the claim in an earlier epoch of this admission, with their reasons;
    they are not proposed again."""
    nodes: str | None = Field(default=None, max_length=4096)
    """Placement nodes, comma-separated (for kubectl get)."""
    vote_count: str | None = Field(default=None, max_length=16)
    """YES votes over votes needed, e.g. 2/3 (for kubectl get)."""
    truth: Truth | None = Field(default=None, json_schema_extra=ATOMIC_MAP)
    """The decision checked against what happened (admitted and rejected claims)."""
    conditions: list[Condition] | None = None
    """Admitted, Recovered and Falsified."""


class ObjectMeta(Model):
    """The subset of metav1.ObjectMeta the platform reads."""

    name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    creation_timestamp: datetime | None = None
    deletion_timestamp: datetime | None = None
    finalizers: list[str] | None = None


class Resource(Model):
    """A custom resource: its names for the API and the CRD, apiVersion, metadata, and ``wire``
    with its kind (spec and status are the resource's own)."""

    kind: ClassVar[str]
    plural: ClassVar[str]
    singular: ClassVar[str]
    short_names: ClassVar[list[str]]
    namespaced: ClassVar[bool]

    api_version: str = API_VERSION
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)

    def wire(self) -> dict[str, Any]:
        body = super().wire()
        body["kind"] = self.kind
        return body


class CapacityClaim(Resource):
    """A workload's request for capacity, admitted by a quorum of nodes."""

    kind: ClassVar[str] = "CapacityClaim"
    plural: ClassVar[str] = "capacityclaims"
    singular: ClassVar[str] = "capacityclaim"
    short_names: ClassVar[list[str]] = ["cc"]
    namespaced: ClassVar[bool] = True

    spec: CapacityClaimSpec
    status: CapacityClaimStatus | None = None


# ---------------------------------------------------------------------------------------------
# CapacityNode


class Geometry(Model):
    """The discrete units a substrate is made of."""

    units: int = Field(ge=0)
    """host: logical CPUs; gpu: SMs x tensor cores per SM x warp size; database: pool size."""
    detail: dict[str, int] | None = None
    """The factors behind units, e.g. sms, tensorCoresPerSm, warpSize, devices."""


class CapacityNodeSpec(Model):
    """What the node agent measures on this node."""

    node_name: NodeName
    """The Kubernetes node this object describes."""
    substrates: list[Substrate] = Field(default_factory=list, max_length=6)
    """Substrates present and measured on the node."""
    geometry: dict[str, Geometry] | None = None
    """Geometry per substrate."""
    capacity: dict[str, Quantity] | None = None
    """Capacity totals: cpu, memory, nvidia.com/gpu, storage-iops, network-bandwidth,
    db-connections."""


class SignalSummary(Model):
    """Summary of one signal over the measurement window."""

    mean: float
    """Mean over the window."""
    p95: float
    """95th percentile over the window."""
    max: float
    """Maximum over the window."""


class PressureReading(Model):
    """Linux pressure stall information for one resource (percent of time, as the kernel
    reports)."""

    some_avg10: float | None = None
    some_avg60: float | None = None
    full_avg10: float | None = None
    full_avg60: float | None = None


class CgroupLimits(Model):
    """Effective cgroup limits of the measured scope."""

    version: int | None = Field(default=None, ge=1, le=2)
    """cgroup version, 1 or 2."""
    memory_limit_bytes: int | None = Field(default=None, ge=0)
    """Memory limit; absent when unlimited."""
    cpu_limit_cores: float | None = Field(default=None, ge=0)
    """CPU quota in cores; absent when unlimited."""
    cpu_throttled_fraction: float | None = Field(default=None, ge=0, le=1)
    """Share of CPU periods throttled over the window."""


class SubstrateReading(Model):
    """The latest window summary of one substrate."""

    load: SignalSummary
    """The substrate's load series u in [0,1] (worst dimension)."""
    signals: dict[str, SignalSummary] | None = None
    """Every signal of the substrate, summarised."""
    fingerprint: list[Fraction] | None = Field(default=None, max_length=32)
    """Normalised power spectrum of the load (32 bins)."""
    pressure: dict[str, PressureReading] | None = None
    """PSI for cpu, memory and io (host only)."""
    cgroup: CgroupLimits | None = None
    """cgroup limits (host only)."""
    observed_at: datetime
    """When the newest sample was taken."""
    samples: int = Field(ge=0)
    """Samples in the window."""


class GateReading(Model):
    """Unconditional gate readings of one substrate, all in [0,1]."""

    headroom: Fraction
    """min(1 - allocated, 1 - p95(load))."""
    gluing_delta: Fraction
    """Drift between the newest and oldest quarter of the window."""
    lambda1: Fraction
    """Periodicity: largest spectral bin over total power."""
    lambda_int: Fraction
    """Burstiness: upper half of the spectrum over total power."""
    entropy: Fraction
    """Normalised spectral entropy."""


MAX_HOLDERS = 128
"""Upper bound on claims holding a share of one substrate of one node: what the ledger's byte
budget (capacity_api.admission.LEDGER_BYTES, 6 KiB) holds of the shortest holders; the budget
is what the operator enforces."""


class Holder(Model):
    """One claim's share of a node's substrate, written by the operator when it commits."""

    claim: str = Field(min_length=3, max_length=317)
    """namespace/name of the claim."""
    uid: str = Field(min_length=1, max_length=64)
    """metadata.uid of the claim, so a re-created claim of the same name is a different holder."""
    epoch: int = Field(ge=1)
    """The admission epoch that committed the share."""
    share: Fraction
    """Fraction of the substrate held."""


class Allocation(Model):
    """What admitted claims hold on one substrate of the node."""

    share: Fraction
    """Sum of the holders' shares (never above 1: no promise beyond capacity)."""
    claims: int = Field(ge=0)
    """How many claims hold a share."""
    holders: list[Holder] = Field(default_factory=list, max_length=MAX_HOLDERS)
    """The claims holding a share; derived from the claims' status and rebuilt from it on
    operator start."""


class Probe(StrEnum):
    """What a witness's probe of a suspect node's agent health endpoint found."""

    REACHABLE = "Reachable"
    UNREACHABLE = "Unreachable"
    NO_ENDPOINT = "NoEndpoint"


class WitnessReport(Model):
    """What one witness agent sees of a node whose Lease it finds expired (DESIGN section 6)."""

    node: NodeName
    """The suspect node."""
    alive: bool
    """Whether the witness sees it alive: its Lease live in the witness's own read, or its
    agent's health endpoint answering."""
    probe: Probe
    """The probe of the suspect's agent health endpoint."""
    lease_renew_time: datetime | None = None
    """The suspect Lease's renewTime as the witness read it."""
    observed_at: datetime
    """When the witness looked."""


class WitnessStatus(Model):
    """The witness side of a node's agent (written by the agent, its own field manager)."""

    endpoint: str | None = Field(default=None, max_length=512)
    """URL of this node's agent health endpoint, for other agents to probe (none: not probed)."""
    reports: list[WitnessReport] | None = Field(default=None, max_length=16)
    """This agent's view of the nodes whose Leases it finds expired (at most 16)."""


class CapacityNodeStatus(Model):
    """Measured state of a node (agent) and its allocation (operator). The readings, the gates
    and the allocation each have one writer and are atomic for server-side apply."""

    readings: dict[str, SubstrateReading] | None = Field(default=None, json_schema_extra=ATOMIC_MAP)
    """Latest window summary per substrate."""
    gates: dict[str, GateReading] | None = Field(default=None, json_schema_extra=ATOMIC_MAP)
    """Current gate readings per substrate."""
    allocated: dict[str, Allocation] | None = Field(default=None, json_schema_extra=ATOMIC_MAP)
    """Allocation per substrate, owned by the operator and derived from claim status."""
    conditions: list[Condition] | None = None
    """Ready, MemoryPressure, CPUPressure, IOPressure and Stale."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation the status reflects."""
    witness: WitnessStatus | None = None
    """This node's agent as a witness of others: its health endpoint and what it sees of the
    nodes whose Leases expired."""


class CapacityNode(Resource):
    """One node's measured capacity, published by its agent."""

    kind: ClassVar[str] = "CapacityNode"
    plural: ClassVar[str] = "capacitynodes"
    singular: ClassVar[str] = "capacitynode"
    short_names: ClassVar[list[str]] = ["cn"]
    namespaced: ClassVar[bool] = False

    spec: CapacityNodeSpec
    status: CapacityNodeStatus | None = None


# ---------------------------------------------------------------------------------------------
# CapacityBallot

MAX_ATTESTED = 256
"""Upper bound on the nodes one ballot attests alive (the ones its witness was asked about
most recently)."""
MAX_BALLOT_VOTES = 256
"""Upper bound on the votes one ballot holds. A voter keeps only the votes of open epochs
(the operator admits at most ``max_open_proposals``, 64 by default, at a time) and drops a
vote once its claim left that epoch, so a ballot stays a few KiB."""


class BallotVote(Vote):
    """One vote in a node's ballot: a :class:`Vote` and the claim it is for."""

    claim: str = Field(max_length=317)
    """The claim, as namespace/name (for reading; the key of the vote is the claim's uid)."""


class CapacityBallotSpec(Model):
    """Which node's votes the ballot carries."""

    node_name: NodeName
    """The voting node; the ballot's name is the node's name."""


class CapacityBallotStatus(Model):
    """The votes of one node, written by its agent only (node restriction)."""

    alive: dict[str, datetime] | None = Field(
        default=None, max_length=MAX_ATTESTED, json_schema_extra=ATOMIC_MAP
    )
    """Witness attestations: the nodes this node, as a witness, saw alive (a live Lease and a
    fresh CapacityNode) and when. For a proposal that names this node as a witness, an
    attestation of every placement node at or after the proposal's ``attestedSince`` counts as
    its YES; a NO is always a vote in ``votes``. Atomic for server-side apply: the agent
    writes the map as a whole."""

    votes: dict[str, BallotVote] | None = Field(
        default=None, max_length=MAX_BALLOT_VOTES, json_schema_extra=ATOMIC_MAP
    )
    """The node's votes on open proposals, keyed by claim uid; the operator counts the one whose
    epoch is the claim's proposal epoch. Atomic for server-side apply: the agent's merge patches
    add and remove keys, and ``managedFields`` track the map as one field of the agent's."""


class CapacityBallot(Resource):
    """One node's votes on the proposals that name it, one write for all that arrived since."""

    kind: ClassVar[str] = "CapacityBallot"
    plural: ClassVar[str] = "capacityballots"
    singular: ClassVar[str] = "capacityballot"
    short_names: ClassVar[list[str]] = ["cb"]
    namespaced: ClassVar[bool] = False

    spec: CapacityBallotSpec
    status: CapacityBallotStatus | None = None
