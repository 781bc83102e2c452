"""ft_torch: protect a PyTorch training job with ft (in-memory snapshots,
erasure coding across nodes, recovery from memory).

    import ft_torch
    ft_torch.start()                      # before torch.distributed.init_process_group
    ...build the model (DDP), optimizer, scheduler...
    job = ft_torch.attach(model, optimizer, scheduler=scheduler, extras={"data": sampler})
    for step in range(job.restore(), steps):
        ...forward, backward, optimizer.step(), scheduler.step()...
        job.snapshot(step)
    job.finish()

Without ft-smp (no FT_* environment) the same script trains unprotected,
with one warning. See the README, "Use it from PyTorch".
"""

from __future__ import annotations

from ._native import FTError, NoEnvironment

__all__ = ["start", "attach", "snapshot", "current", "FTError", "NoEnvironment", "StateError", "NotAttachedError"]

_session = None
_job = None


def start():
    """Joins the job this process was started for (idempotent). Under a
    coordinator it waits for the coordinator's first instruction and sets
    the torchrun variables of the epoch (MASTER_PORT changes with every
    recovery), so call it before torch.distributed.init_process_group."""
    global _session
    if _session is None:
        from .coordinated import open_session
        _session = open_session()
    return _session


def attach(model, optimizer, scheduler=None, extras=None, *, replicated: bool = True, meta_capacity: int | None = None):
    """Registers the whole training state with the SMP and returns a `Job`.

    model: the module (DDP-wrapped or not): parameters and buffers.
    optimizer: its state (e.g. AdamW moments and step counts) and param groups.
    scheduler: an LR scheduler (its state_dict).
    extras: {name: torch.Generator | tensor | dict | object with state_dict()/
      load_state_dict()}, e.g. the data loader's position.
    replicated: model and optimizer state are the same on every DP rank
      (DDP): each rank stores only its slice, restore gathers the others.
    """
    global _job
    from .job import Job
    from .state import StateError, TrainingState
    session = start()
    if _job is not None:
        for e in TrainingState(model, None, rng=False).entries:
            if e.live and any(e.ptr and e.ptr == o.ptr for o in _job.state.entries):
                raise StateError(f"tensor '{e.name}' is already registered: attach was called twice")
        raise StateError("attach was called twice: this process already has an attached job")
    state = TrainingState(model, optimizer, scheduler, extras, replicated=replicated, meta_capacity=meta_capacity)
    device = None
    if any(e.external for e in state.entries):
        from .cuda import DeviceCopier
        device = DeviceCopier()
    _job = Job(session, state, device)
    return _job


def current():
    """The attached job; NotAttachedError before `attach`."""
    from .job import NotAttachedError
    if _job is None:
        raise NotAttachedError("no job is attached: call ft_torch.attach(model, optimizer, ...) first")
    return _job


def snapshot(step: int) -> None:
    """`current().snapshot(step)`."""
    current().snapshot(step)


def _detached(job) -> None:
    global _job
    if _job is job:
        _job = None


def __getattr__(name):
    if name in ("StateError",):
        from . import state
        return getattr(state, name)
    if name == "NotAttachedError":
        from . import job
        return job.NotAttachedError
    raise AttributeError(name)
