"""`make kind-up` / `hack/kind` and kind-config.yaml, checked without Docker or kind.

Docker does not run on the project's CI machines, so kind itself never runs there (docs/kind.md).
These tests run `hack/kind --dry-run`, which prints every command it would run (one per line,
prefixed with "+ ") and runs none, and hold the steps to what `make kind-up` must do: build the
image, create the cluster from kind-config.yaml, load the same image into it and install the chart
with that image and no pulling. Stubs named docker, kind, helm and go lead PATH and record any
call, so a dry run that ran something fails.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import tomllib
from collections import Counter
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "hack" / "kind"
CLUSTER = "capacity-platform"
# printed as is in a dry run: resolving it could build helm from its Go module
HELM = "$(hack/kube-tools path helm)"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def dry_run(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    """Output lines of `hack/kind ARGS` with stub tools first on PATH; asserts none was called."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    calls = tmp_path / "calls"
    for tool in ("docker", "kind", "helm", "go", "kubectl"):
        stub = stubs / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >>"{calls}"\nexit 1\n')
        stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    base = {k: v for k, v in os.environ.items() if not k.startswith("CAPACITY_")}
    base["PATH"] = f"{stubs}{os.pathsep}{base.get('PATH', '/usr/bin:/bin')}"
    result = subprocess.run(
        [str(SCRIPT), *args],
        env=base | (env or {}),
        cwd=tmp_path,  # the script must find the repository by itself
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert not calls.exists(), f"a dry run ran: {calls.read_text()}"
    return result.stdout.splitlines()


def steps(lines: list[str]) -> list[list[str]]:
    """The printed commands as argv lists; the unresolved helm path becomes "helm"."""
    return [
        shlex.split(line.removeprefix("+ ").replace(HELM, "helm"))
        for line in lines
        if line.startswith("+ ")
    ]


def option(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name} given {argv.count(name)} times in {argv}"
    return argv[argv.index(name) + 1]


def helm_sets(argv: list[str]) -> dict[str, str]:
    pairs = [argv[i + 1].partition("=") for i, arg in enumerate(argv) if arg == "--set"]
    return {key: value for key, _, value in pairs}


@pytest.mark.parametrize(
    ("override", "image", "repository", "tag"),
    [
        (None, f"capacity-platform:{VERSION}", "capacity-platform", VERSION),
        (
            "registry.local:5000/team/cp:dev",
            "registry.local:5000/team/cp:dev",
            "registry.local:5000/team/cp",
            "dev",
        ),
        ("localhost:5000/cp", "localhost:5000/cp", "localhost:5000/cp", "latest"),
    ],
)
def test_up_builds_creates_loads_and_installs_the_same_image(
    tmp_path: Path, override: str | None, image: str, repository: str, tag: str
) -> None:
    env = {} if override is None else {"CAPACITY_IMAGE": override}
    lines = dry_run(tmp_path, "up", "--dry-run", env=env)
    build, create, load, helm = steps(lines)

    assert build[:2] == ["docker", "build"]
    assert option(build, "-t") == image
    assert option(build, "-f") == "Dockerfile"
    assert build[-1] == "."

    assert create[:3] == ["kind", "create", "cluster"]
    assert option(create, "--name") == CLUSTER
    assert option(create, "--config") == "kind-config.yaml"

    assert load[:4] == ["kind", "load", "docker-image", image]
    assert option(load, "--name") == CLUSTER

    assert helm[:5] == [
        "helm",
        "upgrade",
        "--install",
        "capacity-platform",
        "charts/capacity-platform",
    ]
    assert option(helm, "--namespace") == "capacity-system"
    assert "--create-namespace" in helm
    assert option(helm, "--kube-context") == f"kind-{CLUSTER}"
    assert helm_sets(helm) == {
        "image.repository": repository,
        "image.tag": tag,
        "image.pullPolicy": "Never",
    }
    assert "--wait" in helm
    assert option(helm, "--timeout") == "5m"

    assert lines[-1].split() == [
        "kubectl",
        "--context",
        f"kind-{CLUSTER}",
        "get",
        "pods",
        "-n",
        "capacity-system",
    ]


def test_the_dry_run_prints_the_unresolved_helm_path(tmp_path: Path) -> None:
    helm_lines = [line for line in dry_run(tmp_path, "up", "--dry-run") if " upgrade " in line]
    assert helm_lines == [helm_lines[0]]
    assert helm_lines[0].startswith(f"+ {HELM} upgrade --install ")


def test_the_environment_turns_on_the_dry_run_too(tmp_path: Path) -> None:
    by_env = dry_run(tmp_path, "up", env={"CAPACITY_KIND_DRY_RUN": "1"})
    assert by_env == dry_run(tmp_path, "up", "--dry-run")
    assert dry_run(tmp_path, "down", env={"CAPACITY_KIND_DRY_RUN": "1"}) == dry_run(
        tmp_path, "--dry-run", "down"
    )


def test_down_deletes_the_cluster(tmp_path: Path) -> None:
    assert steps(dry_run(tmp_path, "down", "--dry-run")) == [
        ["kind", "delete", "cluster", "--name", CLUSTER]
    ]


@pytest.mark.parametrize("args", [[], ["--dry-run"], ["sideways", "--dry-run"], ["up", "down"]])
def test_bad_usage_runs_nothing(tmp_path: Path, args: list[str]) -> None:
    result = subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "hack/kind up" in result.stderr


def test_kind_config_has_one_control_plane_and_three_workers() -> None:
    config = yaml.safe_load((ROOT / "kind-config.yaml").read_text())
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert config["kind"] == "Cluster"
    assert config["name"] == CLUSTER
    assert Counter(node["role"] for node in config["nodes"]) == {"control-plane": 1, "worker": 3}
    assert config["nodes"][0]["role"] == "control-plane"


@pytest.mark.parametrize(
    ("target", "command"), [("kind-up", "hack/kind up"), ("kind-down", "hack/kind down")]
)
def test_make_targets_run_hack_kind(target: str, command: str) -> None:
    # without the MAKEFLAGS of a make this may run under (they would add "Entering directory")
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    result = subprocess.run(
        ["make", "-n", target],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.splitlines() == [command]
