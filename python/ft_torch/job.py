"""The handle `attach` returns: restore, snapshot, finish."""

from __future__ import annotations

import time

import torch

from .state import DTYPES, StateError, TrainingState


class NotAttachedError(RuntimeError):
    """A snapshot (or restore) asked for before `attach`."""


class Job:
    """A training process's state under ft's protection.

    Steps are the loop's own 0-based indices: `restore()` returns the index
    of the first step to run (0 on a fresh start), `snapshot(step)` is called
    at the end of step `step` (after the optimizer and scheduler steps). The
    SMP stores it as version `step + 1`, the number of updates done, which
    is what `ftctl status` shows as a step.
    """

    def __init__(self, session, state: TrainingState, device_copier=None):
        self.session = session
        self.state = state
        self.client = session.client
        self._device = device_copier
        self._last_version = 0  # the version of the last snapshot or restore
        self._last_step = None
        self._restored = False
        self._closed = False
        self._skipped = 0
        self._hooks = []
        self.blocked_seconds = 0.0  # training thread, in our hooks and snapshot()
        self.snapshots = 0
        if self.client is None:
            return
        committed = self.client.register([(e.name, DTYPES[e.dtype], list(e.shape), e.role, e.flags,
                                           None if e.external or not e.ptr else e.ptr) for e in state.entries])
        self.committed_at_register = committed
        if self._device is not None:
            self._device.bind(self.client, state.entries)
        if state.optimizer is not None:
            self._hooks.append(state.optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._before_update()))
        if state.model is not None and state.buffer_names:
            prefix = state.forward_prefix
            self._hooks.append(state.model.register_forward_pre_hook(lambda module, args: self._wait(prefix)))

    # ---- hooks ------------------------------------------------------------

    def _wait(self, count: int) -> None:
        """Until the first `count` tensors are copied, and the device copies
        are ordered before what the training stream does next."""
        t0 = time.perf_counter()
        self.client.wait_copied(count)
        if self._device is not None:
            self._device.gate()
            if self._device.error is not None:
                raise self._device.error
        self.blocked_seconds += time.perf_counter() - t0

    def _before_update(self) -> None:
        """The optimizer pre-step hook: the update must not overwrite bytes
        the snapshot in flight has not copied yet."""
        self._check_open()
        self._wait(self.state.host_count)

    def _check_open(self):
        if self._closed:
            raise NotAttachedError("this job was finished; attach again to protect a new one")

    # ---- the API ----------------------------------------------------------

    def restore(self) -> int:
        """Restores the last committed snapshot (after a failure) and returns
        the index of the first step to run: 0 on a fresh start. Under a
        coordinator it also waits until every rank is ready and the job
        resumes."""
        self._check_open()
        if self._restored:
            raise RuntimeError("restore() was already called for this job")
        self._restored = True
        if self.client is None:
            return 0
        if self._device is not None:
            version = self._device.restore(lambda: self.session.restore(self.client))
        else:
            version = self.session.restore(self.client)
        if version is not None:
            meta_version = self.state.apply()
            if meta_version != version:
                raise StateError(f"tensor 'meta' says step {meta_version}, the snapshot is of step {version}")
            self._last_version = version
        self.restored_at = time.monotonic()
        self.session.ready(version)
        return version or 0

    def _advance(self, step: int) -> bool:
        """Checks `step` and records it; whether there is an SMP to tell."""
        self._check_open()
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"snapshot step must be a non-negative int, not {step!r}")
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"snapshot step {step} is not after the last one ({self._last_step})")
        self._last_step = step
        if self.client is None:
            return False
        self.session.hold()  # a step boundary: wait here while the coordinator is silent
        return True

    def step_completed(self, step: int) -> None:
        """Step `step` is done, with no snapshot taken (a phase of training
        that needs none): the coordinator still hears that steps complete
        (its step-progress watchdog takes silence for a hang)."""
        if self._advance(step):
            self.session.report_step(step + 1)

    def snapshot(self, step: int) -> None:
        """Protects the state at the end of step `step` (0-based). Returns as
        soon as the copy has started; training goes on while it runs."""
        if not self._advance(step):
            return
        version = step + 1
        t0 = time.perf_counter()
        if version - self._last_version >= self.session.snapshot_interval and self._agree(self._ready_to_snapshot()):
            self.client.wait_before_update()  # the captured buffers are free again
            self.state.check()
            self.state.capture(version)
            self.client.snapshot(version)
            if self._device is not None:
                self._device.copy_round()
            self._last_version = version
            self.snapshots += 1
        elif version - self._last_version >= self.session.snapshot_interval:
            self._skipped += 1
            self.session.report_skipped(self._skipped)
        self.blocked_seconds += time.perf_counter() - t0
        self.session.report_step(version, snapshots=self.snapshots, blocked=self.blocked_seconds)

    def _ready_to_snapshot(self) -> bool:
        """No round pending on this node: by default wait for the previous
        round to commit (at most one in flight bounds the steps a failure
        loses); with FT_SNAPSHOT_SKIP_IF_BUSY=1 do not wait."""
        previous = self._last_version or None
        ready = self.client.can_snapshot(previous)
        pause = 1e-4
        while not ready and not self.session.skip_if_busy:
            self.session.check_running()
            time.sleep(pause)
            pause = min(pause * 2, 0.005)
            ready = self.client.can_snapshot(previous)
        return ready

    def _agree(self, ready: bool) -> bool:
        """Whether every DP rank snapshots this step. Waiting ranks are all
        ready (and need no barrier: see ft_client_can_snapshot); skipping
        ranks agree over torch.distributed."""
        if not self.session.skip_if_busy or self.client.dp_size == 1:
            return ready
        import torch.distributed as dist
        flag = torch.tensor([1 if ready else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def finish(self) -> None:
        """Waits for the last snapshot and, under a coordinator, reports the
        end and waits until the whole job is over."""
        self._check_open()
        if self.client is not None:
            self.client.wait_for_round()
            self.session.done(self._last_step + 1 if self._last_step is not None else self._last_version)
        self.close()

    def close(self) -> None:
        if self._device is not None and not self._closed:
            self._device.close()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._closed = True
        self.session.detach(self)

    def state_hash(self) -> str:
        """A digest of parameters, buffers and optimizer state."""
        return self.state.digest()

    def stats(self) -> dict:
        s = self.client.stats() if self.client is not None else {}
        s.update(snapshots=self.snapshots, skipped=self._skipped, python_blocked_seconds=self.blocked_seconds)
        return s

