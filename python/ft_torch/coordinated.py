"""Opening this process's session, and the session under a coordinator.

Under a coordinator every recovery restarts the training processes: a worker
that hears of a failure (a pause or a restore in a newer epoch than the one
it trains in) replaces itself with a fresh copy of the same command
(execve: the same pid, so its SMP and the coordinator see the same worker),
which restores from its SMP. A fresh process runs the script's own set-up
again on every rank (init_process_group with this epoch's MASTER_PORT, the
DDP constructor's broadcast, the user's collectives), so every rank's
process group is rebuilt the same way whatever the script does, and a
collective left hanging on a dead or stopped peer is simply gone. The new
process says hello before it imports torch (`ft_torch._boot`), so the
coordinator never misses its heartbeats. See the README for what it costs.
"""

from __future__ import annotations

import ctypes
import os
import queue
import select
import sys
import threading
import time

from . import _native
from .session import Local, Unprotected, snapshot_interval

EVENT_RESTORE, EVENT_RESUME, EVENT_PAUSE, EVENT_STOP, EVENT_FENCED = 1, 2, 3, 4, 5


def open_session(environment=os.environ):
    try:
        client = _native.Client()
    except _native.NoEnvironment as e:
        return Unprotected(e.message)
    if not environment.get("FT_COORDINATOR_ENDPOINT"):
        return Local(client, environment)
    return Coordinated(client, environment)


def log(line: str) -> None:
    """One line in the worker's log (stdout, which ft-smp keeps), with the monotonic clock."""
    print(f"ft: {line} t={time.monotonic():.3f}", flush=True)


class Event:
    def __init__(self, handle):
        L = _native.lib()
        self.kind = L.ft_event_kind(handle)
        self.epoch = L.ft_event_epoch(handle)
        self.step = L.ft_event_step(handle)
        self.failed = bool(L.ft_event_failed(handle))
        self.reason = (L.ft_event_reason(handle) or b"").decode(errors="replace")
        self.handle = handle

    def __del__(self):
        if self.handle and _native is not None and _native._lib is not None:
            _native._lib.ft_event_free(self.handle)
            self.handle = None


class Coordinated:
    """Under a coordinator: waits for its instructions, reports progress,
    and restarts the process when the job recovers (see the module doc)."""

    protected = True

    def __init__(self, client: _native.Client, environment=os.environ):
        self.client = client
        self.snapshot_interval = snapshot_interval(environment)
        self.skip_if_busy = environment.get("FT_SNAPSHOT_SKIP_IF_BUSY") == "1"
        self.environment = environment
        L = _native.lib()
        handle = ctypes.c_void_p()
        _native._check(L.ft_control_open(ctypes.byref(handle)))
        self.control = handle
        self.started = time.monotonic()
        self._done = False
        self.events: queue.Queue[Event] = queue.Queue()
        self.restore_event = self._first_restore()
        self.epoch = self.restore_event.epoch
        self._set_torchrun_environment()
        self._paused = False
        self._watcher = threading.Thread(target=self._watch, name="ft-control-watch", daemon=True)
        self._watcher.start()
        self._previous_excepthook = sys.excepthook
        sys.excepthook = self._excepthook

    def _excepthook(self, kind, value, tb) -> None:
        """A collective that failed because a peer died (gloo: "Connection
        closed by peer") is the first sign of a failure the coordinator is
        about to announce: wait for it (the watcher then restarts this
        process) rather than exit and be counted as one more failure."""
        self._previous_excepthook(kind, value, tb)
        if not _collective_error(value):
            return
        grace = float(self.environment.get("FT_TORCH_COLLECTIVE_GRACE_S", "5"))
        log(f"the training thread failed in a collective; waiting up to {grace:g} s for the coordinator's pause")
        time.sleep(grace)
        log("no recovery came: exiting")

    # ---- events --------------------------------------------------------------

    def _next_event(self, timeout: float | None):
        L = _native.lib()
        fd = L.ft_control_fd(self.control)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            handle = ctypes.c_void_p()
            _native._check(L.ft_control_next(self.control, ctypes.byref(handle)))
            if handle.value:
                return Event(handle)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            select.select([fd], [], [], left)

    def _first_restore(self) -> Event:
        """Blocks until the coordinator says what to restore (a new job
        starts; a recovery reaches its restart phase)."""
        while True:
            e = self._next_event(None)
            if e.kind == EVENT_RESTORE:
                log(f"restore instruction: step {e.step} epoch {e.epoch}")
                return e
            self._terminal(e)

    def _terminal(self, e: Event) -> None:
        """Fenced, or a stop before this worker finished, ends the process
        whatever the training thread does (exit 3, or 1 when the job failed)."""
        if e.kind == EVENT_FENCED:
            log(f"fenced: {e.reason}")
            os._exit(3)
        if e.kind == EVENT_STOP and not self._done:
            log(f"stop: {e.reason}")
            os._exit(1 if e.failed else 0)

    def _watch(self) -> None:
        """The coordinator's events while the script trains: a newer epoch
        restarts the process; the rest goes to the training thread. If this
        thread fails, the process ends (a failure the job recovers from)
        rather than train on deaf to the coordinator."""
        try:
            self._follow()
        except BaseException:
            import traceback
            traceback.print_exc()
            log("the control watcher failed: exiting")
            sys.stdout.flush()
            os._exit(1)

    def _follow(self) -> None:
        while True:
            e = self._next_event(None)
            self._terminal(e)
            if e.kind in (EVENT_PAUSE, EVENT_RESTORE) and e.epoch > self.epoch:
                restart(f"{'pause' if e.kind == EVENT_PAUSE else 'restore'} in epoch {e.epoch} (this process trains in epoch {self.epoch})")
            if e.kind == EVENT_PAUSE:
                self._paused = True
                continue
            self.events.put(e)

    # ---- what Job asks --------------------------------------------------------

    def restore(self, client) -> int | None:
        e = self.restore_event
        log(f"attached; restoring {'nothing' if e.step < 0 else f'step {e.step}'}")
        while True:
            if e.step < 0:
                return None
            try:
                _native._check(_native.lib().ft_client_restore_event(client._h, self.control, e.handle))
                log(f"restored step {e.step} from the SMPs")
                return e.step
            except _native.FTError as err:
                # A source died meanwhile: the coordinator says what next (a newer epoch restarts us).
                log(f"restore of step {e.step} failed (epoch {e.epoch}): {err}")
                e = self._wait_for(EVENT_RESTORE)
                self.restore_event = e

    def _wait_for(self, kind: int) -> Event:
        while True:
            e = self.events.get()
            if e.kind == kind and e.epoch == self.epoch:
                return e

    def ready(self, version) -> None:
        L = _native.lib()
        _native._check(L.ft_control_ready(self.control, -1 if version is None else version))
        log(f"ready: restored {version if version is not None else 'nothing'}")
        e = self._wait_for(EVENT_RESUME)
        _native._check(L.ft_control_running(self.control))
        log(f"resume from step {e.step} epoch {e.epoch}")

    def report_step(self, version) -> None:
        self._step = version
        _native._check(_native.lib().ft_control_report(self.control, version, getattr(self, "_skipped", 0)))

    def report_skipped(self, n) -> None:
        self._skipped = n

    def check_running(self) -> None:
        """Called while waiting for a round: nothing to do here (a newer
        epoch restarts the process from the watcher thread)."""

    def done(self, version) -> None:
        self._done = True
        _native._check(_native.lib().ft_control_done(self.control, version))
        log(f"done at step {version}; waiting for the job's end")
        while True:
            e = self.events.get()
            if e.kind == EVENT_STOP:
                log(f"stop: {e.reason}")
                if e.failed:
                    sys.stdout.flush()
                    os._exit(1)
                return

    def detach(self, job) -> None:
        import ft_torch
        ft_torch._detached(job)

    # ---- torchrun's variables ---------------------------------------------------

    def _set_torchrun_environment(self) -> None:
        """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and MASTER_ADDR come
        from ft-smp; MASTER_PORT is this epoch's (FT_MASTER_PORT_BASE +
        epoch mod FT_MASTER_PORT_SPAN), fresh at every recovery."""
        env = os.environ
        env.setdefault("RANK", str(self.client.dp_rank))
        env.setdefault("WORLD_SIZE", str(self.client.dp_size))
        env.setdefault("MASTER_ADDR", env.get("FT_MASTER_ADDR", "127.0.0.1"))
        base = env.get("FT_MASTER_PORT_BASE")
        if base:
            span = int(env.get("FT_MASTER_PORT_SPAN", "64"))
            env["MASTER_PORT"] = str(int(base) + self.epoch % span)
        log(f"epoch {self.epoch}: RANK={env['RANK']} WORLD_SIZE={env['WORLD_SIZE']} "
            f"MASTER_ADDR={env['MASTER_ADDR']} MASTER_PORT={env.get('MASTER_PORT', '(unset)')}")


def _collective_error(e: BaseException) -> bool:
    dist = sys.modules.get("torch.distributed")
    error = getattr(dist, "DistError", None) if dist is not None else None
    return (error is not None and isinstance(e, error)) or (isinstance(e, RuntimeError) and "gloo" in str(e))


def restart(reason: str) -> None:
    """Replaces this process with a fresh copy of its command (same pid),
    started through ft_torch._boot so that it rejoins before importing torch."""
    log(f"restarting the process: {reason}")
    from . import _boot
    argv = _boot.command(sys.executable)
    sys.stdout.flush()
    sys.stderr.flush()
    # Descriptors others opened without close-on-exec (gloo's sockets) must not outlive us.
    for fd in _open_descriptors():
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass
    os.environ["FT_RESTARTS_IN_PLACE"] = str(int(os.environ.get("FT_RESTARTS_IN_PLACE", "0")) + 1)
    os.execv(sys.executable, argv)


def _open_descriptors():
    try:
        return [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        return []
