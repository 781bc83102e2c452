"""A small character-level GPT, trained data parallel (DDP over gloo, CPU),
deterministic, and protected by ft.

    # alone (unprotected, one warning):
    python python/examples/gpt.py --steps 200
    # under ft: 4 nodes x 1 worker, RS(3+1), a snapshot every step
    cluster/launch --nodes 4 --workers-per-node 1 --ec 3+1 --phase-timeout 60 -- python python/examples/gpt.py --steps 300

The ft lines are marked "# ft". Every rank prints `step=S loss=L hash=H`
every --report-every steps and `final step=S hash=H step_ms=M` at the end:
H digests the parameters and the optimizer state (equal on every rank; a
recovered run ends with the same H as an uninterrupted one).
"""

import argparse
import math
import os
import pathlib
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import ft_torch  # ft
import ft_torch.ddp  # ft: bit-exact resume (see its docstring)


class Block(nn.Module):
    def __init__(self, embd, heads, dropout):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(embd)
        self.qkv = nn.Linear(embd, 3 * embd)
        self.proj = nn.Linear(embd, embd)
        self.ln2 = nn.LayerNorm(embd)
        self.fc = nn.Linear(embd, 4 * embd)
        self.out = nn.Linear(4 * embd, embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class GPT(nn.Module):
    def __init__(self, vocab, block, embd, heads, layers, dropout):
        super().__init__()
        self.tok = nn.Embedding(vocab, embd)
        self.pos = nn.Embedding(block, embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(embd, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(embd)
        self.head = nn.Linear(embd, vocab, bias=False)

    def forward(self, idx, targets):
        x = self.drop(self.tok(idx) + self.pos(torch.arange(idx.shape[1])))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16, help="sequences per rank and step")
    p.add_argument("--block", type=int, default=64, help="context length")
    p.add_argument("--embd", type=int, default=96)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--report-every", type=int, default=50)
    p.add_argument("--corpus", default=str(pathlib.Path(__file__).parent / "data" / "corpus.txt"))
    p.add_argument("--snapshots", choices=["on", "off", "alternate"], default="on",
                   help="off: attach but never snapshot; alternate: blocks of --alternate-every steps without and with snapshots, "
                        "timed apart (the cost of protection measured in one run)")
    p.add_argument("--alternate-every", type=int, default=25, help="steps per block with --snapshots alternate")
    p.add_argument("--ddp-hook", choices=["canonical", "stock"], default="canonical",
                   help="canonical: ft's hook, bit-exact resume; stock: DDP's own bucketed all-reduce")
    args = p.parse_args()

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    ft_torch.start()  # ft: joins the job (sets MASTER_PORT for this epoch) before the process group
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    joined = time.monotonic()
    if world > 1:
        dist.init_process_group("gloo")
    grouped = time.monotonic()

    text = pathlib.Path(args.corpus).read_text()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    torch.manual_seed(args.seed)
    model = GPT(len(chars), args.block, args.embd, args.heads, args.layers, args.dropout)
    if world > 1:
        model = DDP(model)
        if args.ddp_hook == "canonical":
            ft_torch.ddp.register(model)  # ft: every gradient summed the same way in a restarted process
    wrapped = time.monotonic()
    print(f"setup: process_group_ms={(grouped - joined) * 1000:.0f} ddp_ms={(wrapped - grouped) * 1000:.0f} t={wrapped:.3f}",
          flush=True)
    decay = [q for n, q in model.named_parameters() if q.dim() >= 2]
    no_decay = [q for n, q in model.named_parameters() if q.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    sampler = torch.Generator().manual_seed(args.seed + 1 + rank)  # this rank's batches
    torch.manual_seed(args.seed + 1000 + rank)  # this rank's dropout
    job = ft_torch.attach(model, optimizer, scheduler=schedule, extras={"data": sampler})  # ft

    def batch():
        starts = torch.randint(0, len(data) - args.block - 1, (args.batch,), generator=sampler)
        x = torch.stack([data[s:s + args.block] for s in starts])
        y = torch.stack([data[s + 1:s + args.block + 1] for s in starts])
        return x, y

    first = job.restore()  # ft: 0, or the step after the last committed snapshot
    if first:
        print(f"restored step={first} hash={job.state_hash()}", flush=True)
    began = time.perf_counter()
    times = {True: [], False: []}  # step times with and without snapshots (the first step of each block left out)
    for step in range(first, args.steps):
        t0 = time.perf_counter()
        protect = args.snapshots == "on" or (args.snapshots == "alternate" and (step // args.alternate_every) % 2 == 1)
        x, y = batch()
        loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()  # ft: waits here, only if the last snapshot still copies these tensors
        schedule.step()
        if protect:
            job.snapshot(step)  # ft: returns at once; the copy runs in the background
        else:
            job.step_completed(step)  # (--snapshots off/alternate) no snapshot, but the coordinator hears the step
        if step % args.alternate_every:
            times[protect].append(time.perf_counter() - t0)
        if (step + 1) % args.report_every == 0:
            print(f"step={step + 1} loss={loss.item():.4f} hash={job.state_hash()}", flush=True)
    ran = args.steps - first
    step_ms = (time.perf_counter() - began) * 1000 / max(1, ran)
    split = "".join(f" step_ms_{k}={sum(v) * 1000 / len(v):.2f}" for k, v in (("on", times[True]), ("off", times[False])) if v)
    print(f"final step={args.steps} hash={job.state_hash()} step_ms={step_ms:.2f}{split}", flush=True)
    job.finish()  # ft: waits for the last snapshot, then (under a coordinator) for the whole job's end
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
