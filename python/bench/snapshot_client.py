"""The Python path of `ft-bench snapshot --client python`: one worker with S
bytes of state (two tensors, as the Swift path's bench), protected through
ft_torch's public API (attach, the optimizer pre-step hook, snapshot), under
the SMP named by the FT_* environment. Prints one JSON object:

  staging_s            synchronous snapshots (snapshot + wait for the round), each
  blocked_s_per_step   the asynchronous loop: time the training thread spent in
                       ft_torch (the pre-step hook's wait and snapshot()) per step
  step_s               the loop's simulated compute per step
  python_s_per_snapshot  snapshot()'s own Python work (checks, RNG, meta) per call
"""

import argparse
import json
import time

import torch

import ft_torch


def spin(seconds: float) -> None:
    """Busy compute standing in for forward and backward (holds one core)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--repetitions", type=int, default=5)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--step-ms", type=float, required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    half = args.bytes // 2 // 4
    model = torch.nn.Module()
    model.params = torch.nn.Parameter(torch.rand(half), requires_grad=False)
    model.moments = torch.nn.Parameter(torch.rand(half), requires_grad=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    job = ft_torch.attach(model, optimizer)
    assert job.restore() == 0
    step = 0
    staging = []
    for _ in range(args.repetitions):
        t = time.perf_counter()
        job.snapshot(step)
        job.client.wait_for_round()
        staging.append(time.perf_counter() - t)
        step += 1
    before = job.blocked_seconds
    python_work = 0.0
    for _ in range(args.steps):
        spin(args.step_ms / 1000)
        optimizer.step()  # the pre-step hook waits only if the copy still needs these bytes
        with torch.no_grad():
            model.params[0] += 1  # the update (cheap here, as in the Swift bench)
        t = time.perf_counter()
        job.snapshot(step)
        python_work += time.perf_counter() - t
        step += 1
    blocked = (job.blocked_seconds - before) / args.steps
    job.client.wait_for_round()
    stats = job.stats()
    job.finish()
    print(json.dumps({"staging_s": staging, "blocked_s_per_step": blocked, "step_s": args.step_ms / 1000,
                      "python_s_per_snapshot": python_work / args.steps, "skipped": stats["skipped"]}))


if __name__ == "__main__":
    main()
