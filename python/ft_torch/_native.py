"""ctypes bindings of the worker library's C interface (ft_worker.h).

Only this module touches ctypes. Every call goes through `_check`, which
turns an ft status into an `FTError` carrying the stable code name and the
library's sentence. This module imports no torch.
"""

from __future__ import annotations

import ctypes
import os
import pathlib

ABI_VERSION = 1

DTYPE_CODES = {"float32": 1, "float16": 2, "bfloat16": 3, "float64": 4, "int32": 5, "int64": 6, "uint8": 7}
ROLE_CODES = {"param": 1, "optimizer": 2, "rng": 3, "meta": 4}
REPLICATED = 1
EXTERNAL = 2

EVENT_NAMES = {1: "pause", 2: "restore", 3: "resume", 4: "stop", 5: "fenced"}


class FTError(RuntimeError):
    """A failure reported by the worker library: `code` is the stable status
    name (e.g. "FT_E_REFUSED"), `status` its number."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class NoEnvironment(FTError):
    """Not started by ft-smp (the FT_* environment is missing)."""


def library_path() -> pathlib.Path:
    """FT_WORKER_LIB (the launcher sets it beside its binaries), else the
    newest libFTWorkerC.so built in this repository (.build/release or
    .build/debug, for an editable install)."""
    explicit = os.environ.get("FT_WORKER_LIB")
    if explicit:
        return pathlib.Path(explicit)
    root = pathlib.Path(__file__).resolve().parents[2]
    found = [p for p in (root / ".build/release/libFTWorkerC.so", root / ".build/debug/libFTWorkerC.so") if p.exists()]
    if not found:
        raise FileNotFoundError(
            "libFTWorkerC.so not found: set FT_WORKER_LIB, or build it (swift build) in " + str(root))
    return max(found, key=lambda p: p.stat().st_mtime)


_lib = None


def lib():
    """The loaded library, with argument and result types declared once."""
    global _lib
    if _lib is not None:
        return _lib
    L = ctypes.CDLL(str(library_path()))
    P, I, I64, U, SZ, D = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_uint, ctypes.c_size_t, ctypes.c_double
    pI64, pSZ, pI, pD, pP = (ctypes.POINTER(t) for t in (I64, SZ, I, D, P))
    signatures = {
        "ft_abi_version": ([], I),
        "ft_status_name": ([I], ctypes.c_char_p),
        "ft_last_error": ([], ctypes.c_char_p),
        "ft_client_open": ([pP], I),
        "ft_client_close": ([P], None),
        "ft_client_identity": ([P, pI64, pI64, pI64], I),
        "ft_registration_new": ([pP], I),
        "ft_registration_free": ([P], None),
        "ft_registration_add": ([P, ctypes.c_char_p, I, I, pI64, I, U, P], I),
        "ft_registration_count": ([P], SZ),
        "ft_client_register": ([P, P, pI64], I),
        "ft_client_snapshot": ([P, I64], I),
        "ft_client_wait_before_update": ([P], I),
        "ft_client_wait_copied": ([P, SZ], I),
        "ft_client_wait_for_round": ([P], I),
        "ft_client_can_snapshot": ([P, I64, pI], I),
        "ft_client_restore": ([P, pI64], I),
        "ft_client_stats": ([P, pI64, pI64, pD, pD, pI64], I),
        "ft_client_slot": ([P, I, pP, pSZ], I),
        "ft_client_placement": ([P, SZ, pSZ, pSZ, pSZ], I),
        "ft_client_round_slot": ([P, pI], I),
        "ft_client_external_landed": ([P, I], I),
        "ft_client_set_restore_buffer": ([P, SZ, P, SZ], I),
        "ft_control_open": ([pP], I),
        "ft_control_close": ([P], None),
        "ft_control_fd": ([P], I),
        "ft_control_next": ([P, pP], I),
        "ft_control_state": ([P, pI, pI, ctypes.POINTER(ctypes.c_uint64)], I),
        "ft_control_set_activity": ([P, I, I64], I),
        "ft_event_source_count": ([P], SZ),
        "ft_event_source": ([P, SZ], ctypes.c_char_p),
        "ft_client_restore_from": ([P, I64, ctypes.POINTER(ctypes.c_char_p), SZ], I),
        "ft_control_ready": ([P, I64], I),
        "ft_control_restore_failed": ([P, ctypes.c_char_p], I),
        "ft_control_running": ([P], I),
        "ft_control_report": ([P, I64, I64], I),
        "ft_control_report_snapshots": ([P, I64, ctypes.c_double], I),
        "ft_control_done": ([P, I64], I),
        "ft_event_kind": ([P], I),
        "ft_event_epoch": ([P], ctypes.c_uint64),
        "ft_event_step": ([P], I64),
        "ft_event_failed": ([P], I),
        "ft_event_reason": ([P], ctypes.c_char_p),
        "ft_event_free": ([P], None),
    }
    for name, (args, res) in signatures.items():
        f = getattr(L, name)
        f.argtypes = args
        f.restype = res
    version = L.ft_abi_version()
    if version != ABI_VERSION:
        raise FTError(-1, "FT_E_VERSION", f"{library_path()} implements ABI version {version}, this package needs {ABI_VERSION}")
    _lib = L
    return L


def _check(status: int) -> None:
    if status == 0:
        return
    L = lib()
    code = L.ft_status_name(status).decode()
    message = L.ft_last_error().decode(errors="replace")
    raise (NoEnvironment if code == "FT_E_NO_ENVIRONMENT" else FTError)(status, code, message)


class Client:
    """One SMP client (`ft_client`), opened from the FT_* environment."""

    def __init__(self):
        L = lib()
        handle = ctypes.c_void_p()
        _check(L.ft_client_open(ctypes.byref(handle)))
        self._h = handle
        rank, size, restarts = ctypes.c_int64(), ctypes.c_int64(), ctypes.c_int64()
        _check(L.ft_client_identity(self._h, ctypes.byref(rank), ctypes.byref(size), ctypes.byref(restarts)))
        self.dp_rank, self.dp_size, self.restart_count = rank.value, size.value, restarts.value
        self.registered = 0

    def close(self) -> None:
        if self._h:
            lib().ft_client_close(self._h)
            self._h = None

    def register(self, tensors) -> int | None:
        """`tensors`: (name, dtype name, shape, role, flags, data pointer or
        None). All or nothing. Returns the SMP's committed step, if any."""
        L = lib()
        reg = ctypes.c_void_p()
        _check(L.ft_registration_new(ctypes.byref(reg)))
        try:
            for name, dtype, shape, role, flags, ptr in tensors:
                dims = (ctypes.c_int64 * max(1, len(shape)))(*shape)
                _check(L.ft_registration_add(reg, name.encode(), DTYPE_CODES[dtype], len(shape), dims, ROLE_CODES[role], flags, ptr))
            committed = ctypes.c_int64()
            _check(L.ft_client_register(self._h, reg, ctypes.byref(committed)))
        finally:
            L.ft_registration_free(reg)
        self.registered = len(tensors)
        return None if committed.value < 0 else committed.value

    def snapshot(self, step: int) -> None:
        _check(lib().ft_client_snapshot(self._h, step))

    def wait_before_update(self) -> None:
        _check(lib().ft_client_wait_before_update(self._h))

    def wait_copied(self, count: int) -> None:
        _check(lib().ft_client_wait_copied(self._h, count))

    def wait_for_round(self) -> None:
        _check(lib().ft_client_wait_for_round(self._h))

    def can_snapshot(self, previous: int | None) -> bool:
        """No copy in flight and `previous` (this worker's last snapshot or
        restore) committed, or no round pending on the node."""
        can = ctypes.c_int()
        _check(lib().ft_client_can_snapshot(self._h, -1 if previous is None else previous, ctypes.byref(can)))
        return bool(can.value)

    def restore(self) -> int | None:
        step = ctypes.c_int64()
        _check(lib().ft_client_restore(self._h, ctypes.byref(step)))
        return None if step.value < 0 else step.value

    def stats(self) -> dict:
        staged, skipped, committed = ctypes.c_int64(), ctypes.c_int64(), ctypes.c_int64()
        blocked, last = ctypes.c_double(), ctypes.c_double()
        _check(lib().ft_client_stats(self._h, ctypes.byref(staged), ctypes.byref(skipped), ctypes.byref(blocked),
                                     ctypes.byref(last), ctypes.byref(committed)))
        return {"staged": staged.value, "skipped": skipped.value, "blocked_seconds": blocked.value,
                "last_round_seconds": last.value, "last_committed": None if committed.value < 0 else committed.value}

    # external tensors

    def slot(self, index: int) -> tuple[int, int]:
        base, size = ctypes.c_void_p(), ctypes.c_size_t()
        _check(lib().ft_client_slot(self._h, index, ctypes.byref(base), ctypes.byref(size)))
        return base.value or 0, size.value

    def placement(self, index: int) -> tuple[int, int, int]:
        """(slot offset, source byte offset, stored bytes) of tensor `index`."""
        a, b, c = ctypes.c_size_t(), ctypes.c_size_t(), ctypes.c_size_t()
        _check(lib().ft_client_placement(self._h, index, ctypes.byref(a), ctypes.byref(b), ctypes.byref(c)))
        return a.value, b.value, c.value

    def round_slot(self) -> int | None:
        slot = ctypes.c_int()
        _check(lib().ft_client_round_slot(self._h, ctypes.byref(slot)))
        return None if slot.value < 0 else slot.value

    def external_landed(self, ok: bool = True) -> None:
        _check(lib().ft_client_external_landed(self._h, 1 if ok else 0))

    def set_restore_buffer(self, index: int, ptr: int | None, size: int) -> None:
        _check(lib().ft_client_set_restore_buffer(self._h, index, ptr, size))
