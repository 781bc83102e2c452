"""A training job's whole state as tensors the SMP can hold.

`TrainingState` collects, from a model, an optimizer, an LR scheduler and
user extras:

- *live* tensors, registered in place (zero copy): the model's parameters
  and buffers and the optimizer's tensor state (AdamW moments and step
  counts). The library copies them in the background after `snapshot`;
  the optimizer pre-step hook (and, for buffers, a forward pre-hook) waits
  before they are overwritten.
- *captured* tensors, owned here and filled at each snapshot: the torch RNG
  states (CPU, and every CUDA device when present) and generators and
  tensors given as extras.
- one *meta* tensor: everything that is not a tensor (optimizer param
  groups and scalar state, the scheduler's and extras' `state_dict()`,
  numpy's and Python's RNG states), pickled with its length in front.

Registration order puts the small captured tensors and the buffers first,
so a forward pass waits only for them.
"""

from __future__ import annotations

import hashlib
import pickle
import random
import struct
import sys
from dataclasses import dataclass

import torch

from ._native import EXTERNAL, REPLICATED

DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64",
          torch.int32: "int32", torch.int64: "int64", torch.uint8: "uint8"}

META_FORMAT = 1


class StateError(ValueError):
    """State that cannot be protected as given; the message names the tensor."""


@dataclass
class Entry:
    name: str
    tensor: torch.Tensor
    role: str  # param, optimizer, rng, meta
    replicated: bool
    live: bool  # registered in place (else a buffer owned here)
    ptr: int = 0
    shape: tuple = ()
    dtype: torch.dtype = torch.uint8
    # Where the owner keeps it now (a module attribute, an optimizer state
    # slot): a tensor replaced there is caught at the next snapshot.
    current: object = None
    # Device memory: copied into the slot by ft_torch.cuda, not the library.
    external: bool = False

    @property
    def flags(self) -> int:
        return (REPLICATED if self.replicated else 0) | (EXTERNAL if self.external else 0)

    def check(self) -> None:
        """The tensor must be what was registered: same memory, shape, dtype."""
        t = self.current() if self.current is not None else self.tensor
        if not isinstance(t, torch.Tensor):
            raise StateError(f"tensor '{self.name}' is gone from its owner since it was registered")
        if t.dtype != self.dtype or tuple(t.shape) != self.shape:
            raise StateError(f"tensor '{self.name}' changed from {DTYPES.get(self.dtype, self.dtype)}{list(self.shape)} to "
                             f"{DTYPES.get(t.dtype, t.dtype)}{list(t.shape)} since it was registered; its shape and dtype must stay")
        if t.numel() and t.data_ptr() != self.ptr:
            raise StateError(f"tensor '{self.name}' moved to other memory since it was registered (replaced instead of "
                             "updated in place?)")


def _validate(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise StateError(f"'{name}' is a {type(t).__name__}, not a tensor")
    if t.dtype not in DTYPES:
        raise StateError(f"tensor '{name}' has dtype {t.dtype}, which is not supported "
                         f"(supported: {', '.join(DTYPES.values())})")
    if t.device.type not in ("cpu", "cuda"):
        raise StateError(f"tensor '{name}' is on device {t.device}; only cpu and cuda are supported")
    if not t.is_contiguous():
        raise StateError(f"tensor '{name}' is not contiguous (shape {list(t.shape)}, strides {list(t.stride())}); "
                         "registered tensors must be contiguous")
    if t.is_sparse or t.is_quantized:
        raise StateError(f"tensor '{name}' has layout {t.layout}; only dense tensors are supported")


def _bytes_of(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _zero_like_fresh(v):
    return v.zero_() if isinstance(v, torch.Tensor) else type(v)(0) if isinstance(v, (int, float)) else v


def materialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Creates the optimizer's lazily created state (AdamW's moments and step
    counts appear at its first step) so that it can be registered before
    training: one step with zero gradients and lr (and weight decay) 0,
    then every new state value set back to zero. Parameters are unchanged
    bit for bit (AdamW multiplies by exactly 1 and adds exactly 0). The
    result equals a fresh state for Adam, AdamW, SGD with momentum (no
    dampening), RMSprop and Adagrad; optimizers whose fresh state is not
    zero (NAdam's mu_product) are not supported."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    missing = [p for p in params if p.requires_grad and len(optimizer.state.get(p, {})) == 0]
    if not missing:
        return
    saved_groups = [{k: g[k] for k in ("lr", "weight_decay") if k in g} for g in optimizer.param_groups]
    saved_grads = [p.grad for p in params]
    try:
        for p in params:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        for g in optimizer.param_groups:
            for k in ("lr", "weight_decay"):
                if k in g:
                    g[k] = 0.0
        with torch.no_grad():
            # The undecorated step: no hooks (ours are not installed yet; the
            # user's, and a scheduler's step counter, must not see this one).
            step = type(optimizer).step
            getattr(step, "__wrapped__", step)(optimizer)
    finally:
        for g, saved in zip(optimizer.param_groups, saved_groups):
            g.update(saved)
        for p, grad in zip(params, saved_grads):
            p.grad = grad
    for p in missing:
        state = optimizer.state[p]
        for k in list(state):
            state[k] = _zero_like_fresh(state[k])


def _attribute(model, dotted: str):
    """A getter of the tensor `model.<dotted>` as the module holds it now."""
    owner, _, attr = dotted.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return lambda: getattr(module, attr, None)


class TrainingState:
    """The state of one training process, as registrable entries."""

    def __init__(self, model, optimizer, scheduler=None, extras=None, *, replicated: bool = True,
                 meta_capacity: int | None = None, rng: bool = True):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.extras = dict(extras or {})
        self.rng = rng
        entries: list[Entry] = []
        owners: dict[int, str] = {}

        def add(name, t, role, replicated_, live, current=None):
            _validate(name, t)
            if t.numel():
                other = owners.get(t.data_ptr())
                if other is not None:
                    raise StateError(f"tensor '{name}' shares its memory with '{other}': a tensor can be registered once")
                owners[t.data_ptr()] = name
            entries.append(Entry(name, t, role, replicated_, live, t.data_ptr() if t.numel() else 0, tuple(t.shape), t.dtype,
                                 current, t.device.type == "cuda"))

        # Captured RNG states and tensor extras: buffers owned here.
        self._captured: list[tuple[tuple, torch.Tensor]] = []  # ((kind, source), buffer)
        if rng:
            self._capture_entry(add, "rng.torch", torch.get_rng_state(), "rng", ("torch", None))
            if torch.cuda.is_available():
                for i, s in enumerate(torch.cuda.get_rng_state_all()):
                    self._capture_entry(add, f"rng.cuda.{i}", s, "rng", ("cuda", i))
        self._stateful: dict[str, object] = {}
        for name, obj in self.extras.items():
            if isinstance(obj, torch.Generator):
                self._capture_entry(add, f"extra.{name}", obj.get_state(), "rng", ("generator", obj))
            elif isinstance(obj, torch.Tensor):
                _validate(f"extra.{name}", obj)
                self._capture_entry(add, f"extra.{name}", obj.detach().cpu().clone(), "meta", ("tensor", obj))
            elif isinstance(obj, dict) or (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                self._stateful[name] = obj
            else:
                raise StateError(f"extra '{name}' is a {type(obj).__name__}: give a torch.Generator, a tensor, a dict, "
                                 "or an object with state_dict() and load_state_dict()")

        # Live: buffers first (a forward pass may update them), then parameters, then optimizer state.
        self.param_names: dict[int, str] = {}
        self.buffer_names = set()
        if model is not None:
            for n, b in model.named_buffers():
                add(f"model.{n}", b, "param", replicated, True, _attribute(model, n))
                self.buffer_names.add(f"model.{n}")
        if model is not None:
            for n, p in model.named_parameters():
                add(f"model.{n}", p, "param", replicated, True, _attribute(model, n))
                self.param_names[id(p)] = n
        self._opt_scalars: dict[str, dict] = {}
        if optimizer is not None:
            materialize_optimizer_state(optimizer)
            for gi, g in enumerate(optimizer.param_groups):
                for pi, p in enumerate(g["params"]):
                    pname = self.param_names.get(id(p), f"group{gi}.param{pi}")
                    for key, v in optimizer.state.get(p, {}).items():
                        if isinstance(v, torch.Tensor):
                            add(f"optimizer.{pname}.{key}", v, "optimizer", replicated, True,
                                lambda opt=optimizer, p=p, key=key: opt.state.get(p, {}).get(key))
        for (kind, source), _ in self._captured:
            if kind == "tensor" and source.numel() and source.data_ptr() in owners:
                raise StateError(f"tensor 'extra.{next(n for n, o in self.extras.items() if o is source)}' shares its memory "
                                 f"with '{owners[source.data_ptr()]}': a tensor can be registered once")
        self.entries = entries
        # The meta tensor: its capacity is fixed at registration.
        first = self._meta_bytes(step=0)
        capacity = meta_capacity or max(64 << 10, 4 * len(first) + (16 << 10))
        if len(first) + 8 > capacity:
            raise StateError(f"tensor 'meta' needs {len(first) + 8} bytes, more than meta_capacity={capacity}")
        self.meta = torch.zeros(capacity, dtype=torch.uint8)
        add("meta", self.meta, "meta", False, False)
        # Registration order: meta and captured first, then the live ones,
        # device tensors last (the library's waits cover the host ones).
        ordered = [entries[-1]] + entries[:-1]
        self.entries = [e for e in ordered if not e.external] + [e for e in ordered if e.external]

    def _capture_entry(self, add, name, value, role, source):
        buf = value.detach().cpu().contiguous().clone()
        add(name, buf, role, False, False)
        self._captured.append((source, buf))

    # ---- the registration -------------------------------------------------

    @property
    def forward_prefix(self) -> int:
        """Tensors (in registration order) a forward pass may write: meta,
        captured buffers and the model's host buffers."""
        return 1 + len(self._captured) + sum(1 for e in self.entries if e.live and not e.external
                                               and e.name in self.buffer_names)

    @property
    def host_count(self) -> int:
        """Tensors the library copies itself (they come first)."""
        return sum(1 for e in self.entries if not e.external)

    def check(self) -> None:
        for e in self.entries:
            e.check()

    # ---- capture (at snapshot) and apply (after restore) ------------------

    def _meta_bytes(self, step: int) -> bytes:
        opt = self.optimizer
        meta = {"format": META_FORMAT, "step": step}
        if opt is not None:
            meta["param_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            scalars = {}
            for gi, g in enumerate(opt.param_groups):
                for pi, p in enumerate(g["params"]):
                    pname = self.param_names.get(id(p), f"group{gi}.param{pi}")
                    s = {k: v for k, v in opt.state.get(p, {}).items() if not isinstance(v, torch.Tensor)}
                    if s:
                        scalars[pname] = s
            meta["optimizer_scalars"] = scalars
        if self.scheduler is not None:
            meta["scheduler"] = self.scheduler.state_dict()
        meta["extras"] = {n: (dict(o) if isinstance(o, dict) else o.state_dict()) for n, o in self._stateful.items()}
        if self.rng:
            meta["python_random"] = random.getstate()
            np = sys.modules.get("numpy")
            if np is not None:
                meta["numpy_random"] = np.random.get_state()
        return pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)

    def capture(self, step: int) -> None:
        """Fills the captured buffers and the meta tensor for a snapshot of
        `step` (the library must be done copying them: wait first)."""
        for (kind, arg), buf in self._captured:
            if kind == "torch":
                buf.copy_(torch.get_rng_state())
            elif kind == "cuda":
                buf.copy_(torch.cuda.get_rng_state(arg))
            elif kind == "generator":
                buf.copy_(arg.get_state())
            else:
                buf.copy_(arg.detach().reshape(buf.shape))
        data = self._meta_bytes(step)
        if len(data) + 8 > self.meta.numel():
            raise StateError(f"tensor 'meta' grew to {len(data) + 8} bytes, beyond its capacity of {self.meta.numel()} "
                             "(attach(meta_capacity=...) sets a larger one)")
        view = self.meta.numpy()
        view[:8] = memoryview(struct.pack("<Q", len(data)))
        view[8:8 + len(data)] = memoryview(data)

    def apply(self) -> int:
        """Loads everything that is not restored in place (RNG states,
        optimizer param groups and scalars, scheduler, extras) from the
        restored buffers. Returns the step the meta tensor carries."""
        view = self.meta.numpy()
        (n,) = struct.unpack("<Q", view[:8].tobytes())
        if n + 8 > self.meta.numel():
            raise StateError(f"tensor 'meta' holds a length of {n} bytes, beyond its capacity")
        meta = pickle.loads(view[8:8 + n].tobytes())  # our own SMP's memory (mode 0600, same user), CRC-checked: trusted
        if meta.get("format") != META_FORMAT:
            raise StateError(f"tensor 'meta' has format {meta.get('format')}, expected {META_FORMAT}")
        for (kind, arg), buf in self._captured:
            if kind == "torch":
                torch.set_rng_state(buf.clone())
            elif kind == "cuda":
                torch.cuda.set_rng_state(buf.clone(), arg)
            elif kind == "generator":
                arg.set_state(buf.clone())
            else:
                with torch.no_grad():
                    arg.copy_(buf.reshape(arg.shape))
        opt = self.optimizer
        if opt is not None:
            for g, saved in zip(opt.param_groups, meta["param_groups"]):
                g.update(saved)
            for gi, g in enumerate(opt.param_groups):
                for pi, p in enumerate(g["params"]):
                    pname = self.param_names.get(id(p), f"group{gi}.param{pi}")
                    opt.state[p].update(meta["optimizer_scalars"].get(pname, {}))
        if self.scheduler is not None:
            self.scheduler.load_state_dict(meta["scheduler"])
        for name, obj in self._stateful.items():
            saved = meta["extras"][name]
            if isinstance(obj, dict):
                obj.clear()
                obj.update(saved)
            else:
                obj.load_state_dict(saved)
        if "python_random" in meta:
            random.setstate(meta["python_random"])
        if "numpy_random" in meta:
            import numpy as np
            np.random.set_state(meta["numpy_random"])
        return meta["step"]

    def digest(self) -> str:
        """SHA-256 (first 24 hex digits) over the live tensors (parameters,
        buffers, optimizer state): equal on every DP rank, and equal between
        a recovered run and an uninterrupted one."""
        h = hashlib.sha256()
        for e in self.entries:
            if e.live:
                h.update(e.name.encode())
                h.update(_bytes_of(e.tensor))
        return h.hexdigest()[:24]
