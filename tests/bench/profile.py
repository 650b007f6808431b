"""A py-spy profile of a running process during a benchmark's measured interval.

``py-spy record`` samples the process (``--nonblocking``: the process is never paused, so the
benchmark's figures stay what they would be without it, at the price of an occasional torn
stack) and writes collapsed stacks; :func:`hot_frames` sums them into the frames that hold the
most samples, inclusive (a frame counts once per sample however deep it recurs), which is what
the benchmarks print. py-spy ships as a wheel on PyPI (the dev extra installs it); attaching to
another process needs root or ptrace rights.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

_LINE = re.compile(r":\d+\)$")


class Profile:
    """``with Profile(pid, path):`` records while the block runs."""

    def __init__(self, pid: int, path: Path, rate: int = 50) -> None:
        self.pid = pid
        self.path = path
        self.rate = rate
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Profile:
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(self.pid), "--rate", str(self.rate), "--nonblocking",
             "--format", "raw", "--output", str(self.path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        return self

    def __exit__(self, *_: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def hot_frames(path: Path, top: int = 25) -> tuple[int, list[tuple[str, int]]]:
    """(samples, [(frame, samples that include it)]) from py-spy's collapsed stacks; frames
    are ``function (file:line)`` as py-spy writes them, with the line dropped."""
    total = 0
    counts: Counter[str] = Counter()
    if not path.exists():
        return 0, []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        samples = int(n)
        total += samples
        frames = {_LINE.sub(")", frame) for frame in stack.split(";")}
        for frame in frames:
            counts[frame] += samples
    return total, counts.most_common(top)


class ApiServerProfile:
    """``with ApiServerProfile(api, seconds, path):`` takes a CPU profile of kube-apiserver
    (``/debug/pprof/profile``, served when the local control plane was started with
    ``CAPACITY_CP_PROFILING=1``) over the first ``seconds`` of the block, through the
    benchmark's own client (``api``, a kubernetes ApiClient), in a thread.
    :func:`apiserver_hot` summarises it with ``go tool pprof``."""

    def __init__(self, api: Any, seconds: int, path: Path) -> None:
        self.api = api
        self.seconds = max(1, seconds)
        self.path = path
        self.error: str | None = None
        self._thread: threading.Thread | None = None

    def _fetch(self) -> None:
        try:
            answer = self.api.call_api(
                "/debug/pprof/profile", "GET",
                query_params=[("seconds", self.seconds)],
                auth_settings=["BearerToken"],
                _preload_content=False,
                _return_http_data_only=True,
                _request_timeout=self.seconds + 30,
            )  # fmt: skip
            self.path.write_bytes(answer.data)
        except Exception as exc:  # not served (profiling off), or the API server went away
            self.error = str(exc)

    def __enter__(self) -> ApiServerProfile:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._fetch, name="apiserver-pprof", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self._thread is not None:
            self._thread.join(self.seconds + 60)


def apiserver_hot(binary: str, path: Path, top: int = 25) -> list[str]:
    """The functions holding the most CPU, inclusive (``go tool pprof -top -cum``), as lines."""
    go = shutil.which("go")
    if go is None or not path.exists():
        return []
    out = subprocess.run(
        [go, "tool", "pprof", "-top", "-cum", f"-nodecount={top}", binary, str(path)],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    lines = out.stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith("flat")), None)
    return [] if start is None else lines[start + 1 :]
