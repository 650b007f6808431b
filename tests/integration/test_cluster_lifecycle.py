"""``hack/control-plane up`` and ``down`` on a private cluster of their own (own state directory,
ports, bridge, subnets and node name), compared with the host as it was before: ``down`` leaves
no process, mount, cgroup, iptables rule or chain, network link, fixed path or changed sysctl
behind, and ``up`` after every process of the cluster was SIGKILLed comes up cleanly.

``hack/test`` runs this module before it starts the shared cluster, so that "before" is the
untouched host. Without root (no real node) these tests say so and skip, or fail where
CAPACITY_REQUIRE_REAL_NODE=1.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests import kube
from tests.cluster import wait_for
from tests.nodes import (
    REQUIRE_REAL_NODE,
    image_ref,
    on_real_node,
    ready,
    real_node_or_skip,
    wait_default_service_account,
)

CONTROL_PLANE = kube.REPO / "hack" / "control-plane"
BRIDGE = "cptest0"
NODE = "lifecycle-node"
SUBNET = "10.246.0.0/16"
SERVICE_CIDR = "10.0.6.0/24"
# values that change on their own on an idle machine
VOLATILE_SYSCTL = re.compile(
    r"^(fs\.(dentry-state|inode-nr|inode-state|file-nr|quota\.)|kernel\.ns_last_pid|kernel\.random\."
    r"|kernel\.pty\.nr|net\.netfilter\.nf_conntrack_count)"
)
FIXED_PATHS = (
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/log/pods",
    "/run/containerd",
    "/var/lib/containerd",
    "/var/lib/cni",
    "/etc/cni",
    "/opt/cni",
    "/run/netns",
    "/usr/libexec/kubernetes",
)


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60).stdout


@dataclass(frozen=True)
class HostState:
    """What a cluster could leave behind on the host."""

    sysctls: dict[str, str]
    iptables: dict[str, list[str]]
    links: frozenset[str]
    routes: frozenset[str]
    mounts: frozenset[str]
    cgroups: frozenset[str]
    paths: frozenset[str]

    @classmethod
    def take(cls) -> HostState:
        sysctls = {}
        for line in _run("sysctl", "-a").splitlines():
            key, _, value = line.partition(" = ")
            if not VOLATILE_SYSCTL.match(key):
                sysctls[key] = value
        iptables = {
            f"{tool} -t {table}": sorted(_run(tool, "-w", "5", "-t", table, "-S").splitlines())
            for tool in ("iptables", "ip6tables")
            for table in ("filter", "nat", "mangle", "raw")
        }
        links = frozenset(
            line.split(":")[1].strip().split("@")[0]
            for line in _run("ip", "-o", "link", "show").splitlines()
        )
        routes = frozenset(
            # carrier flags come and go with other clusters' pods: not a route of ours
            line.replace(" linkdown", "").replace(" dead", "").strip()
            for line in _run("ip", "-4", "route", "show", "table", "all").splitlines()
            + _run("ip", "-6", "route", "show", "table", "all").splitlines()
        )
        mounts = frozenset(
            line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
        )
        cgroups = frozenset(
            str(p)
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if " - cgroup" in line
            for p in Path(line.split()[4]).glob("capacity-*")
        )
        paths = frozenset(p for p in FIXED_PATHS if os.path.lexists(p))
        return cls(sysctls, iptables, links, routes, mounts, cgroups, paths)

    def differences(self, after: HostState) -> list[str]:
        """What ``after`` has that this state had not, or has changed. Things that went away
        (a link or mount of some other process's) are not ours to report, except iptables
        rules: a cluster must never delete someone else's."""
        out = [
            f"sysctl {key}: {self.sysctls.get(key)!r} -> {value!r}"
            for key, value in sorted(after.sysctls.items())
            if self.sysctls.get(key) != value
        ]
        for key, rules in self.iptables.items():
            added = sorted(set(after.iptables.get(key, [])) - set(rules))
            removed = sorted(set(rules) - set(after.iptables.get(key, [])))
            out += [f"{key}: added {r}" for r in added] + [f"{key}: removed {r}" for r in removed]
        for what in ("links", "routes", "mounts", "cgroups", "paths"):
            left = getattr(after, what) - getattr(self, what)
            out += [f"{what}: left behind {x}" for x in sorted(left)]
        return out


def our_processes(state: Path) -> list[str]:
    """Processes whose command line names the private cluster's state directory or bridge."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if str(state) in cmdline or "10.246.0.1" in cmdline:
                found.append(f"{proc.name}: {cmdline[:200]}")
    return found


@dataclass
class PrivateCluster:
    state: Path
    env: dict[str, str]

    def run(self, command: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(CONTROL_PLANE), command],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def up(self) -> Path:
        out = self.run("up")
        assert out.returncode == 0, f"up failed:\n{out.stderr[-4000:]}"
        return Path(out.stdout.strip().splitlines()[-1])

    def down(self) -> None:
        out = self.run("down")
        assert out.returncode == 0, f"down failed:\n{out.stderr[-4000:]}"

    def pids(self) -> dict[str, int]:
        return {p.stem: int(p.read_text()) for p in self.state.glob("*.pid")}


@pytest.fixture
def host_before() -> HostState:
    if os.geteuid() != 0:
        why = "the real node needs root: hack/control-plane up runs kwok nodes only"
        if os.environ.get(REQUIRE_REAL_NODE) == "1":
            pytest.fail(f"{why} ({REQUIRE_REAL_NODE}=1)")
        pytest.skip(why)
    return HostState.take()


@pytest.fixture
def private(host_before: HostState) -> Iterator[PrivateCluster]:
    state = Path(tempfile.mkdtemp(prefix="cp-", dir="/tmp"))
    env = {
        "CAPACITY_CP_DIR": str(state),
        "CAPACITY_CP_PORT": "26443",
        "CAPACITY_CP_ETCD_PORT": "24790",
        "CAPACITY_CP_BRIDGE": BRIDGE,
        "CAPACITY_CP_NODE_NAME": NODE,
        "CAPACITY_CP_NODE_SUBNET": SUBNET,
        "CAPACITY_CP_SERVICE_CIDR": SERVICE_CIDR,
        "CAPACITY_CP_KWOK_NODES": "1",
        "CAPACITY_CP_REAL_NODE": "1",
    }
    cluster = PrivateCluster(state, env)
    try:
        yield cluster
    finally:
        cluster.run("down")  # idempotent: a failed test still leaves the host clean
        shutil.rmtree(state, ignore_errors=True)


def wait_node_ready(core: client.CoreV1Api) -> None:
    wait_for(f"node {NODE} Ready", lambda: ready(core.read_node(NODE)), timeout=120)


def start_sleeper(core: client.CoreV1Api) -> None:
    """A pod on the node, so that there are shims, mounts, cgroups and a veth to clear."""
    wait_default_service_account(core, "default")
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "sleeper"},
        "spec": on_real_node(
            {
                "containers": [
                    {
                        "name": "main",
                        "image": image_ref("testbox"),
                        "imagePullPolicy": "Never",
                        "command": ["sleep", "3600"],
                    }
                ]
            }
        ),
    }
    core.create_namespaced_pod("default", body)


def sleeper_running(core: client.CoreV1Api) -> bool:
    live = core.read_namespaced_pod("sleeper", "default")
    return live.status.phase == "Running" and all(
        cs.ready for cs in live.status.container_statuses or []
    )


def test_up_then_down_leaves_the_host_as_it_was(
    private: PrivateCluster, host_before: HostState
) -> None:
    kubeconfig = private.up()
    api = kube.api_client(kubeconfig)
    core = client.CoreV1Api(api)
    wait_node_ready(core)
    start_sleeper(core)
    wait_for("pod sleeper Running", lambda: sleeper_running(core), timeout=90)
    during = HostState.take()
    assert BRIDGE in during.links
    assert any("unreachable 10.246.0.0/16" in r for r in during.routes), during.routes
    assert during.cgroups - host_before.cgroups, "the node's cgroups exist while it runs"
    assert our_processes(private.state)
    pids = private.pids()
    assert {"etcd", "kube-apiserver", "kubelet", "containerd", "kwok"} <= set(pids)

    # a second up reuses every running process
    private.up()
    assert private.pids() == pids
    api.close()

    private.down()
    assert our_processes(private.state) == []
    assert host_before.differences(HostState.take()) == []


def test_up_after_everything_was_killed_comes_up_cleanly(
    private: PrivateCluster, host_before: HostState
) -> None:
    kubeconfig = private.up()
    api = kube.api_client(kubeconfig)
    core = client.CoreV1Api(api)
    wait_node_ready(core)
    start_sleeper(core)
    wait_for("pod sleeper Running", lambda: sleeper_running(core), timeout=90)
    api.close()

    # what a cut-off session leaves: every process SIGKILLed, no down; pid files, sockets,
    # mounts, cgroups, the bridge and the containers' processes stay behind
    socket = private.state / "node" / "containerd" / "containerd.sock"
    shims = [int(line.split(":")[0]) for line in our_processes(private.state) if "shim" in line]
    assert shims, f"the sleeper's containerd shim (it names {socket})"
    for pid in [*private.pids().values(), *shims]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    crashed = HostState.take()
    assert host_before.differences(crashed), "the crash left state behind to clear"

    kubeconfig = private.up()
    api = kube.api_client(kubeconfig)
    core = client.CoreV1Api(api)
    wait_node_ready(core)
    # the kubelet runs the pod again, in a new sandbox on the cleared node
    wait_for("pod sleeper Running again", lambda: sleeper_running(core), timeout=120)
    api.close()

    private.down()
    assert our_processes(private.state) == []
    assert host_before.differences(HostState.take()) == []


def test_without_a_real_node_up_says_why_in_one_line_and_runs_kwok_nodes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where no kubelet can run (here: told so), ``up`` names the reason once and carries on;
    a test that needs the real node then fails with that reason under CAPACITY_REQUIRE_REAL_NODE=1
    and skips with it otherwise."""
    state = Path(tempfile.mkdtemp(prefix="cp-", dir="/tmp"))
    cluster = PrivateCluster(
        state,
        {
            "CAPACITY_CP_DIR": str(state),
            "CAPACITY_CP_PORT": "26443",
            "CAPACITY_CP_ETCD_PORT": "24790",
            "CAPACITY_CP_REAL_NODE": "0",
            "CAPACITY_CP_KWOK_NODES": "2",
        },
    )
    try:
        out = cluster.run("up")
        assert out.returncode == 0, out.stderr[-3000:]
        said = [line for line in out.stderr.splitlines() if "no real node" in line]
        assert said == [
            "control-plane: no real node: CAPACITY_CP_REAL_NODE=0; carrying on with kwok nodes only"
        ]
        api = kube.api_client(Path(out.stdout.strip().splitlines()[-1]))
        core = client.CoreV1Api(api)
        nodes = core.list_node().items
        monkeypatch.setenv("CAPACITY_CP_DIR", str(state))
        monkeypatch.setenv(REQUIRE_REAL_NODE, "1")
        with pytest.raises(pytest.fail.Exception, match=r"^no real node: CAPACITY_CP_REAL_NODE=0"):
            real_node_or_skip(core)
        monkeypatch.setenv(REQUIRE_REAL_NODE, "0")
        with pytest.raises(pytest.skip.Exception, match=r"^no real node: CAPACITY_CP_REAL_NODE=0"):
            real_node_or_skip(core)
        api.close()
        assert sorted(n.metadata.name for n in nodes) == ["kwok-node-0", "kwok-node-1"]
        assert all(ready(n) for n in nodes)
        status = cluster.run("status")
        assert "real node:               none (CAPACITY_CP_REAL_NODE=0)" in status.stdout
        assert "containerd" not in status.stdout
    finally:
        cluster.run("down")
        shutil.rmtree(state, ignore_errors=True)
    assert our_processes(state) == []


def test_host_settings_stay_while_another_node_runs_and_return_after_the_last(
    private: PrivateCluster, host_before: HostState
) -> None:
    """Two clusters with a real node each: the kubelet's host settings are restored only when
    the last node of the machine stops, never under a running kubelet."""
    kubeconfig = private.up()
    api = kube.api_client(kubeconfig)
    wait_node_ready(client.CoreV1Api(api))
    api.close()
    during = HostState.take()
    changed = {k for k, v in during.sysctls.items() if host_before.sysctls.get(k) != v}
    assert "vm.overcommit_memory" in changed, "the kubelet sets its kernel tunables"
    second_state = Path(tempfile.mkdtemp(prefix="cp-", dir="/tmp"))
    second = PrivateCluster(
        second_state,
        {
            **private.env,
            "CAPACITY_CP_DIR": str(second_state),
            "CAPACITY_CP_PORT": "29443",
            "CAPACITY_CP_ETCD_PORT": "26790",
            "CAPACITY_CP_BRIDGE": "cptest1",
            "CAPACITY_CP_NODE_SUBNET": "10.248.0.0/16",
            "CAPACITY_CP_SERVICE_CIDR": "10.0.8.0/24",
            "CAPACITY_CP_NODE_NAME": "second-node",
        },
    )
    try:
        second.up()
        second.down()
        after_second = HostState.take()
        # the first kubelet still runs with the settings it made
        assert {k: after_second.sysctls.get(k) for k in changed} == {
            k: during.sysctls[k] for k in changed
        }
        assert "cptest1" not in after_second.links
        assert BRIDGE in after_second.links
    finally:
        second.run("down")
        shutil.rmtree(second_state, ignore_errors=True)
    private.down()
    assert host_before.differences(HostState.take()) == []
