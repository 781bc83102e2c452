"""One DP rank for test_dp_slices: `train STEPS` or `restore`, against the
SMP named by the FT_* environment; prints `hash=` and `step=`."""

import os
import pathlib
import sys
import time

import torch

from ft_torch import _native
from ft_torch.job import Job
from ft_torch.session import Local
from ft_torch.state import TrainingState


def barrier(rank: int, size: int) -> None:
    """Every rank registered before any snapshots (a coordinator's job in a real run)."""
    d = pathlib.Path(os.environ["FT_TEST_BARRIER_DIR"])
    (d / f"registered-{rank}").touch()
    deadline = time.monotonic() + 60
    while not all((d / f"registered-{r}").exists() for r in range(size)):
        if time.monotonic() > deadline:
            sys.exit("barrier timed out")
        time.sleep(0.01)


def main():
    mode = sys.argv[1]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.Tanh(), torch.nn.Linear(300, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    client = _native.Client()
    sampler = torch.Generator().manual_seed(100 + client.dp_rank)
    job = Job(Local(client, {}), TrainingState(model, opt, extras={"sampler": sampler}))
    if mode == "train":
        barrier(client.dp_rank, client.dp_size)
        assert job.restore() == 0
        data = torch.Generator().manual_seed(7)  # the same batches on every rank: replicated state stays equal
        for step in range(int(sys.argv[2])):
            loss = model(torch.randn(8, 64, generator=data)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            torch.rand(1, generator=sampler)
            job.snapshot(step)
        client.wait_for_round()
        print(f"step={step + 1} hash={job.state_hash()} sampler={torch.rand(1, generator=sampler).item()}")
    else:
        step = job.restore()
        print(f"step={step} hash={job.state_hash()} sampler={torch.rand(1, generator=sampler).item()}")
    client.close()


if __name__ == "__main__":
    main()
