"""An agent hosting one node hears only the claims whose proposal names it: the claims watches'
field selectors (``status.proposal.asked``, the CRD's selectable fields) on the real API server."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from kubernetes import client

from capacity_agent import cluster as agent_cluster
from capacity_agent.voter import Measurements, Voter, VoterNode
from capacity_api import GROUP, VERSION
from capacity_api.admission import claim_watch_fields
from capacity_api.models import Proposal, Substrate
from tests.cluster import Cluster, unique, wait_for

JSON = dict[str, Any]


class Heard:
    """What the watch threads hand to the event loop, kept in arrival order."""

    def __init__(self) -> None:
        self.items: list[JSON] = []
        self.lock = threading.Lock()

    def call_soon_threadsafe(self, fn: Callable[..., None], *args: Any) -> None:
        fn(*args)

    def put_nowait(self, item: JSON) -> None:
        with self.lock:
            self.items.append(item)

    def seen(self) -> list[tuple[str, int, bool]]:
        """(claim, epoch, deleted) of every event so far (not the markers after each list)."""
        with self.lock:
            return [
                (
                    item["metadata"]["name"],
                    int(((item.get("status") or {}).get("proposal") or {}).get("epoch", 0)),
                    bool(item.get("_deleted")),
                )
                for item in self.items
                if "metadata" in item
            ]


@contextmanager
def watching(kubeconfig: Path, node: str) -> Iterator[Heard]:
    """The claims watches of an agent process hosting ``node`` alone, as its voter runs them."""
    heard = Heard()
    access = agent_cluster.load(str(kubeconfig))
    api = agent_cluster.api_client(access, pool=4, timeout=5.0)
    hosted = VoterNode(node, cast(Measurements, None), lambda: None)
    voter = Voter(api, {node: hosted}, "unused")
    threads = [
        threading.Thread(target=voter._watch, args=(heard, heard, fields), daemon=True)
        for fields in claim_watch_fields([node])
    ]
    for thread in threads:
        thread.start()
    try:
        yield heard
    finally:
        voter._stop.set()
        api.close()  # ends the watches' open requests; each thread then sees the stop
        for thread in threads:
            thread.join(timeout=10)


def propose(cluster: Cluster, namespace: str, name: str, epoch: int, voters: list[str]) -> None:
    proposal = Proposal(
        epoch=epoch,
        placement=voters[:1],
        voters=voters,
        deadline=datetime.now(UTC) + timedelta(seconds=30),
        share=0.1,
        substrate=Substrate.HOST,
    )
    cluster.custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        "capacityclaims",
        name,
        {"status": {"phase": "Voting", "proposal": proposal.wire()}},
    )


def test_an_agent_of_one_node_hears_only_the_proposals_that_name_it(
    kubeconfig: Path, cluster: Cluster, namespace: str
) -> None:
    node = unique("n")
    others = [unique(f"o{i}") for i in range(4)]
    for name in ("placed", "witness", "wide", "elsewhere", "waiting"):
        cluster.create_claim(namespace, name, cGeo=0.1)
    propose(cluster, namespace, "placed", 1, [node, others[0], others[1]])
    propose(cluster, namespace, "witness", 1, [others[0], others[1], node])
    propose(cluster, namespace, "wide", 1, others)  # four voters: every one-node agent looks
    propose(cluster, namespace, "elsewhere", 1, others[:3])
    with watching(kubeconfig, node) as heard:
        # the initial lists: what names the node, and every proposal of more than three voters
        wait_for(
            "the listed claims",
            lambda: {c for c, _, _ in heard.seen()} >= {"placed", "witness", "wide"},
            timeout=30,
        )
        # a new epoch that names it (in another field) comes in; one that drops it comes as a
        # deletion of what the node last saw
        propose(cluster, namespace, "elsewhere", 2, [others[0], node, others[1]])
        propose(cluster, namespace, "placed", 2, others[:3])
        moved = {("elsewhere", 2, False), ("placed", 1, True)}
        wait_for("the new epochs", lambda: moved <= set(heard.seen()), timeout=30)
        # the claim deleted while it names the node is gone for it too
        cluster.delete_claim(namespace, "witness")
        wait_for("the deletion", lambda: ("witness", 1, True) in heard.seen(), timeout=30)
        seen = heard.seen()
    names = {c for c, _, _ in seen}
    assert "waiting" not in names  # no proposal at all
    assert ("elsewhere", 1, False) not in seen  # the epoch that did not name it
    assert ("placed", 2, False) not in seen  # nor the one that dropped it
    assert names == {"placed", "witness", "wide", "elsewhere"}


def test_proposals_carry_their_voters_one_field_each_as_the_api_server_stores_them(
    api: client.ApiClient, cluster: Cluster, namespace: str
) -> None:
    cluster.create_claim(namespace, "three", cGeo=0.1)
    propose(cluster, namespace, "three", 1, ["a", "b", "c"])
    stored = cluster.claim(namespace, "three")
    assert stored is not None
    assert stored["status"]["proposal"]["asked"] == {"first": "a", "second": "b", "third": "c"}
    # the API server selects on them (kubectl get cc --field-selector ...)
    listed = client.CustomObjectsApi(api).list_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "capacityclaims",
        field_selector="status.proposal.asked.third=c",
    )
    assert [item["metadata"]["name"] for item in listed["items"]] == ["three"]
