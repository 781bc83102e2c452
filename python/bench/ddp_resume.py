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
ms_per_step is the median step time of the uninterrupted run's second half.
"""

import argparse
import json
import os
import pathlib
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


def rank_main(rank, world, port, way, phase, steps, directory, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    corpus = pathlib.Path(__file__).resolve().parents[1] / "examples" / "data" / "corpus.txt"
    text = corpus.read_text()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    torch.manual_seed(1)
    model = DDP(GPT(len(chars), 64, 96, 4, 3, 0.1), broadcast_buffers=False, find_unused_parameters=way == "find-unused")
    if way == "canonical":
        ft_torch.ddp.register(model)
    elif way == "per-tensor":
        model.register_comm_hook(None, per_tensor_hook)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    materialize_optimizer_state(opt)
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
    times = []
    for _ in range(first, stop):
        t = time.perf_counter()
        starts = torch.randint(0, len(data) - 65, (16,), generator=sampler)
        x = torch.stack([data[i:i + 64] for i in starts])
        y = torch.stack([data[i + 1:i + 65] for i in starts])
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    if phase == "half":
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "sampler": sampler.get_state(),
                    "rng": torch.get_rng_state(), "step": stop}, checkpoint)
    if rank == 0:
        results[phase] = (TrainingState(model, opt, rng=False).digest(), statistics.median(times[len(times) // 2:]) * 1000)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--ways", nargs="+", choices=WAYS, default=WAYS)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as d, mp.Manager() as manager:
        for way in args.ways:
            results = manager.dict()
            for phase in ("full", "half", "resume"):
                mp.spawn(rank_main, args=(args.ranks, free_port(), way, phase, args.steps, d, results), nprocs=args.ranks)
            out[way] = {"exact": results["full"][0] == results["resume"][0], "ms_per_step": round(results["full"][1], 1)}
            if not args.json:
                print(f"{way:12} resume exact: {'yes' if out[way]['exact'] else 'NO '}   {out[way]['ms_per_step']:7.1f} ms/step",
                      flush=True)
    if args.json:
        print(json.dumps({"section": "ddp-resume", "ranks": args.ranks, "steps": args.steps, "ways": out}, sort_keys=True))


if __name__ == "__main__":
    main()
