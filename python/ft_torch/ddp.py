"""A DDP communication hook that makes a resumed run bit-exact.

Stock DDP all-reduces gradients in buckets (flat buffers of several
gradients). It builds the buckets in reverse parameter order when it is
constructed and rebuilds them after the first iteration in the order the
gradients became ready. A restarted process is in its first iteration
again, so its buckets, and with them how gloo cuts the flat buffer and in
which order it adds the ranks' pieces, differ from those of the
uninterrupted run at the same step: the sum differs in its last bits (the
same with static_graph=True or one bucket of everything).

`canonical_allreduce_hook` lays every gradient out in parameter order and
all-reduces them together, so every element is summed the same way
whatever DDP's buckets are, at about the cost of stock DDP on this machine
(python/bench/ddp_resume.py measures it against stock DDP and against
all-reducing each gradient on its own, which is also exact but twice as
slow here). A user needs it only when a resumed run must equal an
uninterrupted one bit for bit (audits, reproducing a loss spike); without
it a resume is exact up to the rounding of the first step after it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class CanonicalOrder:
    """The state of `canonical_allreduce_hook`: the parameters' order and the
    buckets parked until the last one of a step arrives."""

    def __init__(self, ddp_model, group=None):
        params = [p for p in ddp_model.parameters() if p.requires_grad]
        self.order = {id(p): i for i, p in enumerate(params)}
        self.total = len(params)
        self.group = group
        self.parked = []


def canonical_allreduce_hook(state: CanonicalOrder, bucket):
    """DDP comm hook: one all-reduce per step over every gradient laid out in
    parameter order, whatever DDP's buckets are.

    Each bucket's call parks the bucket; the call that completes the set
    flattens all gradients in parameter order (one flat buffer per dtype),
    averages them with one all-reduce each, writes the results back into
    the buckets and completes every bucket's future. Every element is then
    summed the same way in a fresh process (initial buckets) as in a
    long-running one (rebuilt buckets). It gives up DDP's overlap of
    communication with the backward pass.

        model = DDP(net)
        model.register_comm_hook(CanonicalOrder(model), canonical_allreduce_hook)
    """
    future = torch.futures.Future()
    state.parked.append((bucket.parameters(), bucket.gradients(), bucket.buffer(), future))
    if sum(len(p) for p, _, _, _ in state.parked) < state.total:
        return future
    parked, state.parked = state.parked, []
    grads = sorted(((state.order[id(p)], g) for ps, gs, _, _ in parked for p, g in zip(ps, gs)), key=lambda x: x[0])
    group = state.group if state.group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    for dtype in sorted({g.dtype for _, g in grads}, key=str):
        same = [g for _, g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        flat.div_(world)
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in same:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    for _, _, buffer, f in parked:
        f.set_result(buffer)
    return future


def register(ddp_model, group=None) -> None:
    """Registers `canonical_allreduce_hook` on a DistributedDataParallel model."""
    ddp_model.register_comm_hook(CanonicalOrder(ddp_model, group), canonical_allreduce_hook)
