"""Every program finds its cluster as kubectl does, and says in one line when it cannot.

The first tests need no cluster: a kubeconfig whose server is a closed loopback port. The last
ones use the test cluster through ``$KUBECONFIG`` alone, with no ``--kubeconfig`` flag.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cluster import Proc, running, show, wait_for
from tests.kube import REPO

CLOSED = "https://127.0.0.1:1"
PROGRAMS = {
    "capacity-operator": ["-m", "capacity_operator", "--standalone"],
    "capacity-agent": ["-m", "capacity_agent", "--node-name", "n1", "--health-port", "0"],
    "capctl": ["-m", "capacity_cli", "nodes"],
}


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"}
        and not k.endswith("_KUBECONFIG")
    }
    return {**env, **extra}


def closed_kubeconfig(path: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": CLOSED}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return path


@pytest.mark.parametrize("prog", sorted(PROGRAMS))
@pytest.mark.parametrize("via", ["flag", "env"])
def test_unreachable_cluster_is_one_line(prog: str, via: str, tmp_path: Path) -> None:
    kubeconfig = closed_kubeconfig(tmp_path / "kubeconfig")
    argv = [sys.executable, *PROGRAMS[prog]]
    env = clean_env(HOME=str(tmp_path))
    if via == "flag":
        argv[3:3] = ["--kubeconfig", str(kubeconfig)]
    else:
        env["KUBECONFIG"] = f"{tmp_path / 'missing'}:{kubeconfig}"
    out = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=60, check=False, cwd=REPO
    )
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    assert out.stderr == (
        f"{prog}: cannot reach the Kubernetes API server at {CLOSED}: connection refused\n"
    )


def test_capctl_uses_kubeconfig_env(kubeconfig: Path, crds: list[str], tmp_path: Path) -> None:
    out = subprocess.run(
        [str(REPO / ".venv" / "bin" / "capctl"), "-o", "json", "nodes"],
        capture_output=True,
        text=True,
        env=clean_env(KUBECONFIG=str(kubeconfig), HOME=str(tmp_path)),
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert isinstance(yaml.safe_load(out.stdout), list)


def test_operator_uses_kubeconfig_env_for_its_client_and_kopf(
    kubeconfig: Path, namespace: str, tmp_path: Path
) -> None:
    """No --kubeconfig: the operator's own client (startup: the engine reads nodes and leases)
    and kopf's login both come from $KUBECONFIG."""
    operator = Proc(
        "operator",
        [
            sys.executable,
            "-m",
            "capacity_operator",
            "--namespace",
            namespace,
            "--claim-namespace",
            namespace,
            "--standalone",
        ],
        tmp_path / "operator.log",
        # the child's environment is ours plus these: $KUBECONFIG wins over an inherited one, and
        # an inherited CAPACITY_OPERATOR_KUBECONFIG (the flag's setting) is blanked
        env={"KUBECONFIG": str(kubeconfig), "CAPACITY_OPERATOR_KUBECONFIG": ""},
    )
    with running(operator):
        try:
            wait_for(
                "the operator to log in and start",
                lambda: (
                    "Initial authentication has finished" in operator.output()
                    and "admission engine ready" in operator.output()
                ),
                timeout=60,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{show(operator)}") from None
        assert operator.alive, show(operator)
