"""Fixtures: a real ft-smp (no coordinator) per test, started and ended by PID."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time
import uuid

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def binaries() -> pathlib.Path:
    """FT_BIN, else the newest of .build/debug and .build/release that holds ft-smp."""
    if os.environ.get("FT_BIN"):
        return pathlib.Path(os.environ["FT_BIN"])
    found = [d for d in (ROOT / ".build/debug", ROOT / ".build/release") if (d / "ft-smp").exists()]
    if not found:
        pytest.fail(f"no ft-smp built under {ROOT}/.build: run swift build first")
    return max(found, key=lambda d: (d / "ft-smp").stat().st_mtime)


class SMP:
    """`ft-smp --workers 0`: workers of this test connect to it themselves."""

    def __init__(self):
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="ft-py-"))
        self.job = "py" + uuid.uuid4().hex[:12]
        self.endpoint = f"ipc://{self.dir}/smp.sock"
        self.log = open(self.dir / "smp.log", "wb")
        self.proc = subprocess.Popen([str(binaries() / "ft-smp"), "--job-id", self.job, "--node-id", "n0", "--run-dir",
                                      str(self.dir), "--workers", "0", "--endpoint", self.endpoint, "--log-level", "warning"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not (self.dir / "smp.sock").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ft-smp did not start: {(self.dir / 'smp.log').read_text()}")
            time.sleep(0.01)

    def env(self, worker="w0", rank=0, size=1, restarts=0) -> dict:
        return {"FT_JOB_ID": self.job, "FT_WORKER_ID": worker, "FT_DP_RANK": str(rank), "FT_DP_SIZE": str(size),
                "FT_SMP_ENDPOINT": self.endpoint, "FT_RESTART_COUNT": str(restarts)}

    def segments(self) -> list[str]:
        return [n for n in os.listdir("/dev/shm") if n.startswith(f"ft-{self.job}-")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def smp():
    s = SMP()
    yield s
    s.stop()
    assert s.segments() == [], "the SMP left shared memory behind"


@pytest.fixture
def worker_env(monkeypatch):
    """Sets a worker's FT_* environment for this test (restored after)."""
    def apply(env: dict):
        for k in [k for k in os.environ if k.startswith("FT_") and k not in ("FT_BIN", "FT_WORKER_LIB")]:
            monkeypatch.delenv(k)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    apply({})
    return apply


@pytest.fixture
def fresh_module(monkeypatch):
    """ft_torch's module-level session and job, reset for this test."""
    import ft_torch
    monkeypatch.setattr(ft_torch, "_session", None)
    monkeypatch.setattr(ft_torch, "_job", None)
    return ft_torch
