"""`hack/image build platform` makes a real OCI archive of the platform image, and caches it.

No cluster: these tests use none of the conftest's cluster fixtures. The first build runs
mmdebstrap and downloads wheels (about a minute); later builds reuse the cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

import pytest
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "hack" / "images" / "platform"
SITE_PACKAGES = PurePosixPath("opt/capacity/lib/python3.11/site-packages")

pytestmark = [
    pytest.mark.timeout(1800),  # a cold build: mmdebstrap, wheel downloads, two layers
    pytest.mark.skipif(os.geteuid() != 0, reason="hack/image builds as root (mmdebstrap, chroot)"),
    pytest.mark.skipif(
        not (shutil.which("mmdebstrap") and shutil.which("umoci")),
        reason="needs the Debian packages mmdebstrap and umoci",
    ),
]


def build(*names: str) -> list[Path]:
    result = subprocess.run(
        [str(ROOT / "hack" / "image"), "build", *names],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [Path(line) for line in result.stdout.splitlines()]


@dataclass
class Image:
    config: dict[str, object]
    files: dict[str, tarfile.TarInfo]  # the flattened root filesystem, paths without a leading /
    contents: dict[str, bytes]  # the few files the tests read


def read_image(archive: Path, wanted: set[str]) -> Image:
    """Apply the archive's layers in order (whiteouts included) without writing them to disk."""
    with tarfile.open(archive) as outer:

        def blob_file(digest: str) -> IO[bytes]:
            member = outer.extractfile(f"blobs/sha256/{digest.removeprefix('sha256:')}")
            assert member is not None
            return member

        def blob(digest: str) -> bytes:
            return blob_file(digest).read()

        index_file = outer.extractfile("index.json")
        assert index_file is not None
        index = json.load(index_file)
        (descriptor,) = index["manifests"]
        manifest = json.loads(blob(descriptor["digest"]))
        config = json.loads(blob(manifest["config"]["digest"]))
        files: dict[str, tarfile.TarInfo] = {}
        contents: dict[str, bytes] = {}
        for layer in manifest["layers"]:
            # streamed ("r|*": gzip or not, detected), so no layer is held in memory whole
            with tarfile.open(fileobj=blob_file(layer["digest"]), mode="r|*") as tar:
                for member in tar:
                    path = PurePosixPath(member.name.removeprefix("./"))
                    name = path.name
                    if name == ".wh..wh..opq":
                        parent = f"{path.parent}/"
                        for key in [k for k in files if k.startswith(parent)]:
                            del files[key]
                        continue
                    if name.startswith(".wh."):
                        gone = str(path.parent / name.removeprefix(".wh."))
                        for key in [k for k in files if k == gone or k.startswith(gone + "/")]:
                            del files[key]
                        continue
                    files[str(path)] = member
                    if str(path) in wanted and member.isfile():
                        extracted = tar.extractfile(member)
                        assert extracted is not None
                        contents[str(path)] = extracted.read()
    config["annotations"] = descriptor.get("annotations", {})
    return Image(config, files, contents)


def read_list(path: Path) -> list[str]:
    return [
        line.split("#", 1)[0].strip()
        for line in path.read_text().splitlines()
        if line.split("#", 1)[0].strip()
    ]


def project_version() -> str:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


@pytest.fixture(scope="module")
def platform_archive() -> Path:
    (archive,) = build("platform")
    assert archive.is_file()
    assert not archive.is_relative_to(ROOT), "the cache lives outside the repository"
    return archive


@pytest.fixture(scope="module")
def platform_image(platform_archive: Path) -> Image:
    return read_image(platform_archive, {"var/lib/dpkg/status", "etc/passwd"})


def test_config_user_env_and_name(platform_image: Image) -> None:
    config = platform_image.config["config"]
    assert isinstance(config, dict)
    assert config["User"].split(":")[0] == "10001"
    assert "PYTHONUNBUFFERED=1" in config["Env"]
    assert "PYTHONDONTWRITEBYTECODE=1" in config["Env"]
    assert config["Env"][0].startswith("PATH=/opt/capacity/bin:")
    assert "Entrypoint" not in config or not config["Entrypoint"]
    assert config["Labels"]["org.opencontainers.image.version"] == project_version()
    annotations = platform_image.config["annotations"]
    assert isinstance(annotations, dict)
    assert annotations["io.containerd.image.name"] == (
        f"docker.io/library/capacity-platform:{project_version()}"
    )
    assert annotations["org.opencontainers.image.ref.name"] == project_version()


def test_rootfs_has_the_console_scripts_and_user(platform_image: Image) -> None:
    for script in ("capctl", "capacity-operator", "capacity-agent"):
        member = platform_image.files[f"opt/capacity/bin/{script}"]
        assert member.isfile()
        assert member.mode & 0o111
    passwd = platform_image.contents["etc/passwd"].decode()
    assert re.search(r"^capacity:x:10001:10001:", passwd, re.MULTILINE)
    for mountpoint in ("proc", "sys", "dev"):  # the runtime and the chart mount these
        assert platform_image.files[mountpoint].isdir()
        assert not [f for f in platform_image.files if f.startswith(f"{mountpoint}/")]
    assert not [f for f in platform_image.files if f.startswith("var/lib/apt/lists/")]
    assert not [f for f in platform_image.files if f.startswith("usr/share/man/")]


def test_every_listed_package_is_installed(platform_image: Image) -> None:
    status = platform_image.contents["var/lib/dpkg/status"].decode()
    installed = {
        match[1]
        for match in re.finditer(
            r"^Package: (\S+)\n(?:[^\n]+\n)*?Status: install ok installed$", status, re.MULTILINE
        )
    }
    missing = set(read_list(RECIPE / "packages.txt")) - installed
    assert not missing, f"not installed in the image: {sorted(missing)}"


def test_venv_holds_exactly_the_lock_and_the_project(platform_image: Image) -> None:
    found: dict[str, str] = {}
    for path in platform_image.files:
        pure = PurePosixPath(path)
        if pure.parent == SITE_PACKAGES and pure.name.endswith(".dist-info"):
            name, version = pure.name.removesuffix(".dist-info").rsplit("-", 1)
            found[canonicalize_name(name)] = version
    want: dict[str, str] = {
        canonicalize_name(name): version
        for name, version in (line.split("==") for line in read_list(RECIPE / "requirements.txt"))
    }
    want["capacity-platform"] = project_version()
    assert found == want


def test_rebuild_with_nothing_changed_is_cached(platform_archive: Path) -> None:
    started = time.monotonic()
    (again,) = build("platform")
    elapsed = time.monotonic() - started
    assert again == platform_archive
    assert elapsed < 15, f"a cached build took {elapsed:.1f} s"
