"""This process's place in an ft job: unprotected, or under an SMP alone
(under a coordinator too: `agent.TrainerSession`)."""

from __future__ import annotations

import os
import warnings

from . import _native


class Unprotected:
    """No ft-smp around (no FT_* environment): training runs unprotected."""

    client = None
    protected = False
    snapshot_interval = 1
    skip_if_busy = False

    def __init__(self, reason: str):
        self.reason = reason
        warnings.warn(f"ft_torch: training unprotected ({reason})", RuntimeWarning, stacklevel=4)

    def restore(self, client):
        return None

    def ready(self, version):
        pass

    def report_step(self, version, snapshots=None, blocked=0.0):
        pass

    def report_skipped(self, n):
        pass

    def check_running(self):
        pass

    def hold(self):
        pass

    def done(self, version):
        pass

    def detach(self, job):
        import ft_torch
        ft_torch._detached(job)


class Local(Unprotected):
    """Under an SMP without a coordinator: the SMP commits a step once every
    local worker staged it, and a restarted worker restores what it holds."""

    protected = True

    def __init__(self, client: _native.Client, environment=os.environ):
        self.client = client
        self.snapshot_interval = snapshot_interval(environment)
        self.skip_if_busy = environment.get("FT_SNAPSHOT_SKIP_IF_BUSY") == "1"

    def restore(self, client):
        return client.restore()


def snapshot_interval(environment) -> int:
    raw = environment.get("FT_SNAPSHOT_INTERVAL", "1")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"FT_SNAPSHOT_INTERVAL must be a positive number of steps, not {raw!r}")
    return n
