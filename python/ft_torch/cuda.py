"""The GPU path: CUDA tensors copied device-to-host straight into the slot.

UNTESTED: no GPU was available where this was written; the protocol with the
library (slots, placements, the round's slot, "landed", restore buffers) is
exercised on CPU by the tests through `HostCopies`, the CUDA calls are not.

For a CUDA tensor the library does not touch the bytes. At attach both
slots of the SMP's shared memory are registered as pinned memory
(cudaHostRegister), so a copy into them is a DMA. At each snapshot a
helper thread waits until the round has its slot, then, on a side stream
that first waits for the work already queued on the training stream (the
optimizer step), copies each tensor's stored bytes (its DP slice) with an
asynchronous device-to-host copy straight to its place in the slot: no
staging buffer, no serialization. When the copies have landed it tells
the library, which computes their CRCs and only then reports the snapshot
staged. The next optimizer step (and forward, for buffers) waits for the
copies on the GPU (a stream wait, not a host block).
"""

from __future__ import annotations

import ctypes
import threading

import torch


def _slot_tensor(base: int, size: int) -> torch.Tensor:
    """A uint8 CPU tensor over shared memory the library mapped."""
    return torch.frombuffer((ctypes.c_uint8 * size).from_address(base), dtype=torch.uint8)


class DeviceCopies:
    """Copies external (device) tensors into the round's slot."""

    def bind(self, client, entries) -> None:
        self.client = client
        self.items = [(i, e, client.placement(i)) for i, e in enumerate(entries) if e.external]
        self.slots = [_slot_tensor(*client.slot(s)) for s in (0, 1)]
        self.pin()
        self._done = None  # the last round's copies, for the training stream to wait on
        self._thread = None
        self.error = None

    # ---- what differs between CUDA and the CPU stand-in --------------------

    def pin(self) -> None:
        cudart = torch.cuda.cudart()
        for s in self.slots:
            rc = cudart.cudaHostRegister(s.data_ptr(), s.numel(), 0)
            if int(rc) != 0:
                raise RuntimeError(f"cudaHostRegister of a {s.numel()}-byte snapshot slot failed (error {int(rc)})")
        self.stream = torch.cuda.Stream()

    def unpin(self) -> None:
        cudart = torch.cuda.cudart()
        for s in self.slots:
            cudart.cudaHostUnregister(s.data_ptr())

    def enqueue(self, slot: torch.Tensor, after) -> object:
        """Queues every copy into `slot` after the event `after`; returns what
        to wait on."""
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(after)
            for _, e, (offset, source, n) in self.items:
                slot[offset:offset + n].copy_(e.tensor.detach().reshape(-1).view(torch.uint8)[source:source + n], non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def training_point(self):
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream())
        return event

    def gate(self) -> None:
        """The training stream waits for the last round's copies (GPU-side;
        the host waits only until they are queued)."""
        self.wait_queued()
        if self._done is not None:
            torch.cuda.current_stream().wait_event(self._done)

    def host_buffer(self, e) -> torch.Tensor:
        return torch.empty(e.tensor.numel() * e.tensor.element_size(), dtype=torch.uint8, pin_memory=True)

    # ---- the protocol -------------------------------------------------------

    def copy_round(self) -> None:
        """After `ft_client_snapshot`: copy this round's external tensors."""
        if self._thread is not None:
            self._thread.join()
        after = self.training_point()
        done_holder = {}

        def run():
            try:
                slot = self.client.round_slot()
                if slot is None:
                    return  # the SMP skipped the round: nothing to copy
                done = self.enqueue(self.slots[slot], after)
                done_holder["done"] = done
                done.synchronize()
                self.client.external_landed(True)
            except BaseException as e:  # the round fails; the training thread hears it at its next wait
                self.error = e
                self.client.external_landed(False)

        self._thread = threading.Thread(target=run, name="ft-device-copy", daemon=True)
        self._thread.start()
        # The training stream must not overwrite the tensors before the copies read them.
        self._thread_done = done_holder

    def wait_queued(self) -> None:
        """Until this round's copies are queued (so `gate` can wait on them)."""
        if self._thread is not None:
            while self._thread.is_alive() and "done" not in self._thread_done:
                self._thread.join(0.0005)
            self._done = self._thread_done.get("done", self._done)

    def restore(self, restore) -> int | None:
        """Runs `restore()` (the library's) with host buffers for the
        external tensors, then copies what it restored to the device (a
        restore is not the hot path). Returns what `restore()` returns: the
        step restored, or None (nothing: the tensors are left as they are)."""
        buffers = []
        try:
            for i, e, _ in self.items:
                b = self.host_buffer(e)
                buffers.append((e, b))
                self.client.set_restore_buffer(i, b.data_ptr(), b.numel())
            version = restore()
            if version is not None:
                with torch.no_grad():
                    for e, b in buffers:
                        e.tensor.copy_(b.view(e.tensor.dtype).view(e.tensor.shape))
            return version
        finally:
            for i, _, _ in self.items:
                self.client.set_restore_buffer(i, None, 0)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()
        self.unpin()


class HostCopies(DeviceCopies):
    """The same protocol for CPU tensors marked external: the tests' stand-in
    for a GPU (plain copies, no streams)."""

    def pin(self) -> None:
        pass

    def unpin(self) -> None:
        pass

    def enqueue(self, slot, after):
        for _, e, (offset, source, n) in self.items:
            slot[offset:offset + n].copy_(e.tensor.detach().reshape(-1).view(torch.uint8)[source:source + n])
        return _Landed()

    def training_point(self):
        return None

    def gate(self) -> None:
        if self._thread is not None:
            self._thread.join()  # on a CPU the copy itself is the wait

    def host_buffer(self, e):
        return torch.empty(e.tensor.numel() * e.tensor.element_size(), dtype=torch.uint8)


class _Landed:
    def synchronize(self):
        pass
