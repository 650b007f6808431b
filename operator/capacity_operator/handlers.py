"""kopf registrations: thin handlers that hand objects to the admission engine.

Claim and ballot events only feed the admission loop's cache (:meth:`Engine.run` takes the steps,
deadlines and flow control included); truth keeping is one loop over the claims of that cache
under observation, with kopf indexes of their pods and of the Nodes' kubelet pressure;
CapacityNodes and node Leases only feed the engine's caches. No handler needs a finalizer or
kopf's annotations, so kopf writes nothing to a claim: a deletion event takes the claim's
holders out of the ledger, and what a missed event leaves behind is freed by the loop's ledger
garbage collection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterable
from typing import Any, cast

import kopf

from capacity_api import GROUP, VERSION
from capacity_api.lease import parse_lease
from capacity_api.truth import kubelet_pressure as truth_pressure
from capacity_api.webhook import CLAIM_LABEL
from capacity_operator import cluster
from capacity_operator.calibration import Calibrator
from capacity_operator.kube import COMPONENT, JSON, Kube
from capacity_operator.lifecycle import Lifecycle
from capacity_operator.protocol import Engine
from capacity_operator.settings import OperatorSettings
from capacity_operator.store import OutcomeStore, database_url
from capacity_operator.truth import TruthKeeper, pod_view

log = logging.getLogger(__name__)

CLAIMS = (GROUP, VERSION, "capacityclaims")
NODES = (GROUP, VERSION, "capacitynodes")
BALLOTS = (GROUP, VERSION, "capacityballots")


class NoChangeDetection(kopf.AnnotationsDiffBaseStorage):
    """kopf's diff base for an operator without change-detecting handlers.

    kopf builds every object's "essence" (a deep copy of the whole body) and reads the last
    handled one on every watch event, whether or not a handler compares them; only
    ``on.create``/``on.update``/``on.resume``/``on.field`` handlers do, and this operator has
    none (event and index handlers only; a unit test keeps it so). At 30 claims a second that
    copying was a tenth of the operator's CPU. The essence is empty here, so every event is
    "unchanged" for kopf, which is what it is to event handlers.
    """

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None


def _emitter(kube: Kube) -> Callable[[JSON, str, str, str], None]:
    def emit(body: JSON, type_: str, reason: str, message: str) -> None:
        try:
            # kopf posts events for any mapping with apiVersion, kind and metadata
            kopf.event(cast(kopf.Body, body), type=type_, reason=reason, message=message)
        except LookupError:
            # outside kopf's handlers (the node lifecycle loop) kopf has no event queue
            kube.post_event_soon(body, type_, reason, message)

    return emit


def _engine(memo: kopf.Memo) -> Engine:
    engine: Engine = memo["engine"]
    return engine


@kopf.on.startup()
async def startup(
    settings: kopf.OperatorSettings,
    memo: kopf.Memo,
    *,
    # kopf passes its indexes (defined below) to every handler: live views, filled once the
    # watches start
    claim_pods: kopf.Index[tuple[str, str], JSON] | None = None,
    kubelet_pressure: kopf.Index[str, list[JSON]] | None = None,
    **_: Any,
) -> None:
    if claim_pods is None or kubelet_pressure is None:
        raise kopf.PermanentError("kopf passed no indexes to the startup handler")
    cfg: OperatorSettings = memo["settings"]
    # kopf's own bookkeeping under our API group, from day one
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = NoChangeDetection(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # our Events are posted explicitly
    # who posted an Event: this program, and which copy of it (the pod, or host and process)
    instance = f"{socket.gethostname()}-{os.getpid()}"
    settings.posting.reporting_component = COMPONENT
    settings.posting.reporting_instance = instance
    settings.execution.max_workers = cfg.threads
    settings.watching.server_timeout = 300
    settings.peering.name = cfg.peering
    settings.peering.priority = memo["priority"]
    settings.peering.lifetime = cfg.peering_lifetime_seconds
    settings.peering.mandatory = not cfg.standalone
    settings.peering.standalone = cfg.standalone
    settings.peering.clusterwide = True
    kube = Kube(cluster.load(cfg.kubeconfig), pool=cfg.threads, instance=instance)
    memo["kube"] = kube
    if not cfg.standalone:
        await kube.ensure_peering_object(cfg.peering)
    emit = _emitter(kube)
    engine = Engine(kube, cfg, emit)
    memo["engine"] = engine
    store = OutcomeStore(database_url(cfg.store_path, cfg.store_dsn))
    store.start()
    memo["store"] = store
    truth = TruthKeeper(engine, emit, store)
    memo["indexed"] = indexed = asyncio.Event()
    memo["truth"] = asyncio.create_task(
        truth.run(claim_pods, kubelet_pressure, indexed), name="truth"
    )
    await engine.start()
    memo["admission"] = asyncio.create_task(engine.run(), name="admission")
    lifecycle = Lifecycle(engine, kube, emit, priority=memo["priority"])
    memo["lifecycle"] = asyncio.create_task(lifecycle.run(), name="node-lifecycle")
    calibrator = Calibrator(kube, cfg, store, emit, active=lifecycle.active)
    memo["calibration"] = asyncio.create_task(calibrator.run(), name="calibration")
    log.info(
        "admission engine ready: %d nodes, %d leases cached, ledger built from %d claims",
        len(engine.nodes),
        len(engine.leases),
        len(engine.ledger.uids()),
    )


STOP_DRAIN_SECONDS = 10.0
"""How long a graceful stop waits for the admission steps under way to finish their writes."""


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    for name in ("calibration", "lifecycle", "admission", "truth"):
        task = memo.get(name)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    engine: Engine | None = memo.get("engine")
    if engine is not None:
        # no step starts any more; the ones under way finish their writes (a recovery deletes
        # the failed node's pods after its claim write), so that a graceful stop leaves
        # nothing half done. Bounded: a stuck API server does not hold the stop, and a step
        # cut short is what a crash leaves, which the next start picks up from the claims.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(engine.drain(), STOP_DRAIN_SECONDS)
    store: OutcomeStore | None = memo.get("store")
    if store is not None:
        await asyncio.to_thread(store.stop)  # flushes what is pending (bounded wait)
    kube: Kube | None = memo.get("kube")
    if kube is not None:
        await kube.close()


@kopf.on.login()
def login(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    """kopf's credentials: the same source and configuration as the operator's own client
    (:mod:`capacity_operator.cluster`), loaded again on every login, so a re-login after a 401
    picks up a rotated token."""
    cfg: OperatorSettings = memo["settings"]
    access = cluster.load(cfg.kubeconfig)
    return cluster.connection_info(access, trust_env=settings.networking.trust_env)


# -- claims -------------------------------------------------------------------------------------


@kopf.on.event(*CLAIMS)
async def claim_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """Every claim event goes to the admission loop's cache (Engine.run takes the steps)."""
    memo["indexed"].set()  # see node_event
    _engine(memo).observe_claim(dict(event["object"]), deleted=event["type"] == "DELETED")


@kopf.index("pods", labels={CLAIM_LABEL: kopf.PRESENT})
async def claim_pods(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], JSON]:
    """The pods bound to each claim, by (namespace, claim): what truth needs of them only."""
    return {(namespace or "", labels[CLAIM_LABEL]): pod_view(body)}


@kopf.index("nodes")
async def kubelet_pressure(name: str, status: kopf.Status, **_: Any) -> dict[str, list[JSON]]:
    """Each Kubernetes Node's kubelet pressure conditions that are True: truth reads them for
    the placement nodes of an admitted claim. A node without any is not kept (an empty result,
    which also drops what the node had before; None would keep it)."""
    pressure = truth_pressure(status.get("conditions") or [])
    return {name: pressure} if pressure else {}


# -- caches -------------------------------------------------------------------------------------


# The caches are async handlers on purpose: they run on the event loop, like every reader of
# the caches, so no worker thread ever changes a dict that async code is iterating.


@kopf.on.event(*NODES)
async def node_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    # kopf calls resource handlers only once every index has been filled: the truth loop,
    # which reads the indexes, waits for this (a claim checked against an index still empty
    # could be Confirmed without the pod that falsifies it)
    memo["indexed"].set()
    _engine(memo).observe_node(dict(event["object"]), deleted=event["type"] == "DELETED")


@kopf.on.event(*BALLOTS)
async def ballot_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """A node's votes: the claims whose votes changed get a look from the admission loop."""
    _engine(memo).observe_ballot(dict(event["object"]), deleted=event["type"] == "DELETED")


@kopf.on.event("coordination.k8s.io", "v1", "leases")
async def lease_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    engine = _engine(memo)
    obj = event["object"]
    if obj.get("metadata", {}).get("namespace") != engine.settings.namespace:
        return
    engine.observe_lease(parse_lease(obj), deleted=event["type"] == "DELETED")
