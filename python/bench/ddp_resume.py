"""Does a resumed DDP run equal an uninterrupted one, and what does the fix cost?

For each way of all-reducing gradients, runs the GPT example's model data
parallel (gloo, CPU, deterministic) three times: STEPS uninterrupted; STEPS/2
then a checkpoint of everything (model, optimizer, RNG, data position); a
fresh set of processes that loads it and runs to STEPS. "exact" means the
resumed run's final parameters and optimizer state equal the uninterrupted
run's bit for bit.

    python python/bench/ddp_resume.py [--ranks 4] [--steps 40] [--json]

Ways: stock DDP; stock DDP with find_unused_parameters=True (DDP then never
rebuilds its buckets); ft_torch.ddp.canonical_allreduce_hook; and a hook
that all-reduces each gradient on its own (defined here, for comparison).
ms_per_step: the median step time of each way, measured in one set of
processes taking turns (--rounds rounds of 10 steps per way), so that every
way sees the same machine; vs_stock: over stock DDP's.
"""

import argparse
import json
import os
import pathlib
import random
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from gpt import GPT  # noqa: E402

import ft_torch.ddp  # noqa: E402
from ft_torch.state import TrainingState, materialize_optimizer_state  # noqa: E402

WAYS = ["stock", "find-unused", "canonical", "per-tensor"]


def per_tensor_hook(_, bucket):
    world = dist.get_world_size()
    works = [dist.all_reduce(g.div_(world), async_op=True).get_future() for g in bucket.gradients()]
    buffer = bucket.buffer()
    return torch.futures.collect_all(works).then(lambda _: buffer)


def setup(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    corpus = pathlib.Path(__file__).resolve().parents[1] / "examples" / "data" / "corpus.txt"
    text = corpus.read_text()
    chars = sorted(set(text))
    return chars, torch.tensor([chars.index(c) for c in text])


def build(way, chars):
    torch.manual_seed(1)
    model = DDP(GPT(len(chars), 64, 96, 4, 3, 0.1), find_unused_parameters=way == "find-unused")
    if way == "canonical":
        ft_torch.ddp.register(model)
    elif way == "per-tensor":
        model.register_comm_hook(None, per_tensor_hook)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    materialize_optimizer_state(opt)
    return model, opt


def train_step(model, opt, data, sampler):
    starts = torch.randint(0, len(data) - 65, (16,), generator=sampler)
    x = torch.stack([data[i:i + 64] for i in starts])
    y = torch.stack([data[i + 1:i + 65] for i in starts])
    loss = model(x, y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def timing_main(rank, world, port, ways, rounds, results):
    """Every way in the same processes, taking turns."""
    chars, data = setup(rank, world, port)
    built = {way: build(way, chars) for way in ways}
    sampler = torch.Generator().manual_seed(5 + rank)
    times = {way: [] for way in ways}
    for _ in range(rounds):
        for way in ways:
            model, opt = built[way]
            for i in range(10):
                t = time.perf_counter()
                train_step(model, opt, data, sampler)
                if i >= 2:
                    times[way].append(time.perf_counter() - t)
    if rank == 0:
        results.update({way: statistics.median(t) * 1000 for way, t in times.items()})
    dist.destroy_process_group()


def rank_main(rank, world, port, way, phase, steps, directory, results):
    chars, data = setup(rank, world, port)
    model, opt = build(way, chars)
    sampler = torch.Generator().manual_seed(5 + rank)
    torch.manual_seed(9 + rank)
    checkpoint = pathlib.Path(directory) / f"{way}-{rank}.pt"
    first, stop = 0, steps // 2 if phase == "half" else steps
    if phase == "resume":
        s = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(s["model"])
        opt.load_state_dict(s["optimizer"])
        sampler.set_state(s["sampler"])
        torch.set_rng_state(s["rng"])
        first = s["step"]
    for _ in range(first, stop):
        train_step(model, opt, data, sampler)
    if phase == "half":
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "sampler": sampler.get_state(),
                    "rng": torch.get_rng_state(), "step": stop}, checkpoint)
    if rank == 0:
        results[phase] = TrainingState(model, opt, rng=False).digest()
    dist.destroy_process_group()


def free_port():
    """A port below the ephemeral range that is free now (outgoing connections do not take it meanwhile)."""
    while True:
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


def spawn(fn, args, ranks):
    """mp.spawn on a fresh port; again (twice at most) if the port was taken meanwhile."""
    for attempt in range(3):
        try:
            return mp.spawn(fn, args=(ranks, free_port()) + args, nprocs=ranks)
        except mp.ProcessRaisedException as e:
            if "EADDRINUSE" not in str(e) or attempt == 2:
                raise


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--ways", nargs="+", choices=WAYS, default=WAYS)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as d, mp.Manager() as manager:
        timing = manager.dict()
        spawn(timing_main, (args.ways, args.rounds, timing), args.ranks)
        for way in args.ways:
            results = manager.dict()
            for phase in ("full", "half", "resume"):
                spawn(rank_main, (way, phase, args.steps, d, results), args.ranks)
            out[way] = {"exact": results["full"] == results["resume"], "ms_per_step": round(timing[way], 1),
                        "vs_stock": round(timing[way] / timing.get("stock", timing[way]), 3)}
            if not args.json:
                print(f"{way:12} resume exact: {'yes' if out[way]['exact'] else 'NO '}   {out[way]['ms_per_step']:7.1f} ms/step"
                      f"   {out[way]['vs_stock']:.3f} x stock", flush=True)
    if args.json:
        print(json.dumps({"section": "ddp-resume", "ranks": args.ranks, "steps": args.steps, "ways": out}, sort_keys=True))


if __name__ == "__main__":
    main()
