"""The two recipes of the platform image (hack/image and the Dockerfile) cannot drift apart.

Both read hack/images/platform: packages.txt (Debian packages), requirements.txt and pip.txt (the
locked wheels), setup.sh (user, venv, installs) and image.conf (user, venv, env, workdir, labels,
cmd). The Dockerfile cannot read files for USER, ENV, WORKDIR, LABEL or CMD and repeats them; these
tests hold the repeated values, and the lock, to the shared files.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "hack" / "images" / "platform"
RECIPE_MOUNT = "/mnt/recipe"


@dataclass(frozen=True)
class Instruction:
    stage: int
    keyword: str
    args: str


def dockerfile(path: Path = ROOT / "Dockerfile") -> list[Instruction]:
    """Instructions with their continuation lines joined and comment lines dropped."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(stage, keyword.upper(), " ".join(args.split())))
    assert not pending, "the Dockerfile ends in a continuation line"
    return instructions


def shell_assignments(path: Path) -> dict[str, str]:
    """NAME=value assignments of a POSIX shell file holding nothing else (image.conf)."""
    lexer = shlex.shlex(path.read_text(), posix=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    values: dict[str, str] = {}
    for token in lexer:
        name, sep, value = token.partition("=")
        assert sep, f"not an assignment: {token!r}"
        assert re.fullmatch(r"[A-Z_]+", name), f"not a variable name: {name!r}"
        values[name] = value
    return values


def key_values(args: str) -> dict[str, str]:
    """ENV and LABEL arguments: key=value words, shell-quoted."""
    return dict(word.split("=", 1) for word in shlex.split(args))


def run_mounts(args: str) -> tuple[dict[str, dict[str, str]], str]:
    """A RUN's --mount options keyed by target, and its command."""
    words = args.split(" ")
    mounts: dict[str, dict[str, str]] = {}
    while words and words[0].startswith("--mount="):
        spec = words.pop(0).removeprefix("--mount=")
        options = dict(opt.split("=", 1) for opt in spec.split(","))
        mounts[options["target"]] = options
    return mounts, " ".join(words)


def read_list(path: Path) -> list[str]:
    return [
        line.split("#", 1)[0].strip()
        for line in path.read_text().splitlines()
        if line.split("#", 1)[0].strip()
    ]


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return dockerfile()


@pytest.fixture(scope="module")
def final(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


@pytest.fixture(scope="module")
def conf() -> dict[str, str]:
    return shell_assignments(RECIPE / "image.conf")


@pytest.fixture(scope="module")
def script() -> str:
    return (ROOT / "hack" / "image").read_text()


@pytest.fixture(scope="module")
def pyproject() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def pins() -> dict[str, Version]:
    found: dict[str, Version] = {}
    for line in read_list(RECIPE / "requirements.txt"):
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^=\s;]+)", line)
        assert match, f"requirements.txt: not an exact pin: {line!r}"
        name = canonicalize_name(match[1])
        assert name not in found, f"requirements.txt pins {name} twice"
        found[name] = Version(match[2])
    return found


def test_packages_list_is_plain_debian_package_names() -> None:
    packages = read_list(RECIPE / "packages.txt")
    assert "python3" in packages
    for name in packages:
        assert re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", name), f"not a Debian package name: {name}"


def test_dockerfile_apt_installs_packages_txt_and_nothing_else(
    instructions: list[Instruction], final: list[Instruction]
) -> None:
    installs = [i for i in instructions if "apt-get install" in i.args or "apt install" in i.args]
    assert len(installs) == 1, "exactly one apt-get install, in the final stage"
    assert installs[0] in final
    mounts, command = run_mounts(installs[0].args)
    assert mounts[RECIPE_MOUNT]["source"] == "hack/images/platform"
    # the package names come from packages.txt alone: only options follow `apt-get install`
    feed = re.search(r"(\S+) \| xargs apt-get install((?: -\S+)*) (&&|$)", command)
    assert feed, command
    assert f"{RECIPE_MOUNT}/packages.txt" in command.split("|")[0]
    assert "--no-install-recommends" in feed[2].split()
    assert "apt-get install" not in command[feed.end() :]


def test_hack_image_installs_packages_txt_and_nothing_else(script: str) -> None:
    includes = re.findall(r"--include=(.*)", script)
    assert includes == ['$(read_list "$recipes/platform/packages.txt" | paste -sd, -)"']
    # apt-get appears only inside messages (after a quote), never as a command
    assert not re.findall(r"^[^#\"']*\bapt(-get)?\s+install", script, re.MULTILINE)
    assert "setup.sh" in script


def test_both_recipes_run_setup_sh_steps(final: list[Instruction], script: str) -> None:
    steps = []
    for instruction in final:
        if instruction.keyword != "RUN":
            continue
        mounts, command = run_mounts(instruction.args)
        for step in re.findall(rf"sh {RECIPE_MOUNT}/setup\.sh (\w+)", command):
            assert mounts[RECIPE_MOUNT]["source"] == "hack/images/platform"
            steps.append(step)
    assert steps == ["base", "deps", "project"]
    assert re.findall(r'in_rootfs "[^"]+" "[^"]+" (\w+)', script) == ["base", "deps", "project"]
    assert f'/bin/sh {RECIPE_MOUNT}/setup.sh "$@"' in script


def test_both_recipes_use_the_same_requirements(
    instructions: list[Instruction], script: str
) -> None:
    copies = [i.args for i in instructions if i.keyword == "COPY" and ".txt" in i.args]
    assert copies == ["hack/images/platform/pip.txt hack/images/platform/requirements.txt /recipe/"]
    download = next(i.args for i in instructions if "pip download" in i.args)
    assert "--requirement /recipe/requirements.txt" in download
    assert "--requirement /recipe/pip.txt" in download
    assert '--requirement "$recipes/platform/requirements.txt"' in script
    assert '--requirement "$recipes/platform/pip.txt"' in script
    setup = (RECIPE / "setup.sh").read_text()
    assert '--requirement "$recipe/requirements.txt"' in setup


def test_same_user_venv_env_workdir_labels_and_cmd(
    final: list[Instruction], conf: dict[str, str], script: str, pyproject: dict[str, object]
) -> None:
    assert conf["IMAGE_UID"] == "10001"
    assert conf["IMAGE_VENV"] == "/opt/capacity"
    by_keyword: dict[str, list[str]] = {}
    for instruction in final:
        by_keyword.setdefault(instruction.keyword, []).append(instruction.args)
    uid = conf["IMAGE_UID"]
    assert by_keyword["USER"] == [f"{uid}:{uid}"]
    assert '--config.user "$IMAGE_UID:$IMAGE_UID"' in script
    setup = (RECIPE / "setup.sh").read_text()
    assert '--uid "$IMAGE_UID" --gid "$IMAGE_UID"' in setup
    assert 'python3 -m venv --without-pip "$IMAGE_VENV"' in setup

    env = [key_values(args) for args in by_keyword["ENV"]]
    assert len(env) == 1
    assert env[0] == key_values(conf["IMAGE_ENV"])
    assert env[0]["PATH"].split(":")[0] == f"{conf['IMAGE_VENV']}/bin"
    assert env[0]["PYTHONUNBUFFERED"] == env[0]["PYTHONDONTWRITEBYTECODE"] == "1"
    assert by_keyword["WORKDIR"] == [conf["IMAGE_WORKDIR"]]

    project = pyproject["project"]
    assert isinstance(project, dict)
    (arg,) = by_keyword["ARG"]
    assert arg == f"VERSION={project['version']}", "the Dockerfile's VERSION follows pyproject"
    labels = key_values(" ".join(by_keyword["LABEL"]))
    want = dict(line.split("=", 1) for line in conf["IMAGE_LABELS"].splitlines())
    want["org.opencontainers.image.version"] = "${VERSION}"
    assert labels == want
    assert not any("://" in value for value in labels.values()), "no URLs in labels"
    assert [json.loads(args) for args in by_keyword["CMD"]] == [conf["IMAGE_CMD"].split()]
    assert "ENTRYPOINT" not in by_keyword


def test_requirements_pin_every_runtime_dependency_within_its_range(
    pyproject: dict[str, object],
) -> None:
    locked = pins()
    project = pyproject["project"]
    assert isinstance(project, dict)
    for spec in project["dependencies"]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in locked, f"requirements.txt does not pin {name}"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"requirements.txt pins {name}=={locked[name]}, outside {requirement.specifier}"
        )
    assert canonicalize_name(str(project["name"])) not in locked
    assert "pip" not in locked, "pip runs from its wheel (pip.txt) and is not installed"


def test_pip_txt_pins_one_pip() -> None:
    (line,) = read_list(RECIPE / "pip.txt")
    match = re.fullmatch(r"pip==(\S+)", line)
    assert match
    Version(match[1])
