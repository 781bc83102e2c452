"""Every piece of collected state round-trips exactly through a real SMP."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from ft_torch import _native
from ft_torch.job import Job
from ft_torch.session import Local
from ft_torch.state import TrainingState


class Net(torch.nn.Module):
    """Parameters in several dtypes, a BatchNorm (buffers a forward pass
    updates, an int64 counter among them) and dropout (RNG)."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1 = torch.nn.Linear(16, 32)
        self.bn = torch.nn.BatchNorm1d(32)
        self.fc2 = torch.nn.Linear(32, 4)
        self.f16 = torch.nn.Parameter(torch.randn(8, 3, generator=g).to(torch.float16))
        self.b16 = torch.nn.Parameter(torch.randn(5, generator=g).to(torch.bfloat16))
        self.register_buffer("seen", torch.zeros(2, dtype=torch.int64))
        with torch.no_grad():
            for p in (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias):
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        self.seen += 1
        y = torch.dropout(torch.relu(self.bn(self.fc1(x))), 0.2, self.training)
        return self.fc2(y).sum() + self.f16.float().sum() * 1e-3 + self.b16.float().sum() * 1e-3


class Position:
    """A data loader's position, as user code might keep it."""

    def __init__(self):
        self.index = 0

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, d):
        self.index = d["index"]


def setup(seed=0):
    torch.manual_seed(seed)
    model = Net(seed)
    low = [model.f16, model.b16]
    rest = [p for p in model.parameters() if all(p is not q for q in low)]
    opt = torch.optim.AdamW([{"params": rest}, {"params": low, "eps": 1e-3}], lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    sampler = torch.Generator().manual_seed(1234)
    position = Position()
    notes = {"epoch": 0}
    return model, opt, sched, sampler, position, notes


def train_step(model, opt, sched, sampler, position, notes):
    x = torch.randn(6, 16, generator=sampler)
    position.index += 6
    notes["epoch"] = position.index // 12
    np.random.rand(3)
    random.random()
    loss = model(x)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def next_draws(sampler):
    """The next numbers every RNG gives, without disturbing them."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate(), sampler.get_state()
    draws = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], torch.rand(4, generator=sampler))
    torch.set_rng_state(states[0]); np.random.set_state(states[1]); random.setstate(states[2]); sampler.set_state(states[3])
    return draws


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, dtype and shape included."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def attach(objs):
    model, opt, sched, sampler, position, notes = objs
    state = TrainingState(model, opt, sched, {"sampler": sampler, "position": position, "notes": notes})
    return Job(Local(_native.Client(), {}), state)


def test_every_piece_of_state_round_trips_exactly(smp, worker_env):
    worker_env(smp.env())
    objs = setup()
    job = attach(objs)
    assert job.restore() == 0
    model, opt, sched, sampler, position, notes = objs
    for step in range(3):
        train_step(*objs)
        job.snapshot(step)
    job.client.wait_for_round()
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_model = copy.deepcopy(model.state_dict())
    saved_sched = copy.deepcopy(sched.state_dict())
    saved = (position.index, dict(notes))
    draws = next_draws(sampler)
    digest = job.state_hash()
    for _ in range(2):  # not snapshotted: must not come back
        train_step(*objs)
    job.client.close()

    # A restarted worker: fresh objects (another seed), same worker id.
    objs2 = setup(seed=99)
    job2 = attach(objs2)
    assert job2.restore() == 3
    model2, opt2, sched2, sampler2, position2, notes2 = objs2
    assert job2.state_hash() == digest
    for k, v in saved_model.items():
        assert same(model2.state_dict()[k], v), k
    restored_opt = opt2.state_dict()
    assert restored_opt["param_groups"] == saved_opt["param_groups"]
    assert restored_opt["state"].keys() == saved_opt["state"].keys()
    for i, s in saved_opt["state"].items():
        assert restored_opt["state"][i].keys() == s.keys()
        for k, v in s.items():
            assert same(restored_opt["state"][i][k], v), (i, k)
    assert restored_opt["state"][0]["step"].item() == 3  # step counts come back
    assert sched2.state_dict() == saved_sched
    assert (position2.index, notes2) == saved
    after = next_draws(sampler2)
    assert torch.equal(after[0], draws[0])
    assert np.array_equal(after[1], draws[1])
    assert after[2] == draws[2]
    assert torch.equal(after[3], draws[3])
    assert {p.dtype for p in model2.parameters()} >= {torch.float32, torch.float16, torch.bfloat16}
    assert model2.seen.dtype == torch.int64 and model2.seen.tolist() == [3, 3]
    job2.client.close()


def test_training_after_restore_equals_uninterrupted(smp, worker_env):
    worker_env(smp.env())
    objs = setup()
    job = attach(objs)
    job.restore()
    for step in range(6):
        train_step(*objs)
        job.snapshot(step)
        if step == 2:
            job.client.wait_for_round()
            job.client.close()
            objs = setup(seed=7)
            job = attach(objs)
            assert job.restore() == 3
            step_from = 3
            break
    for step in range(step_from, 6):
        train_step(*objs)
        job.snapshot(step)
    job.client.wait_for_round()
    interrupted = job.state_hash()
    job.client.close()

    reference = setup()
    for _ in range(6):
        train_step(*reference)
    # the reference registers nothing: its digest through an unregistered state
    assert TrainingState(reference[0], reference[1], reference[2], {"sampler": reference[3], "position": reference[4],
                                                                    "notes": reference[5]}).digest() == interrupted


def test_restore_with_nothing_committed_is_a_fresh_start(smp, worker_env):
    worker_env(smp.env())
    objs = setup()
    before = TrainingState(objs[0], None).digest()
    job = attach(objs)
    assert job.restore() == 0
    assert TrainingState(objs[0], None).digest() == before
    job.client.close()


@pytest.mark.parametrize("interval", [3])
def test_snapshot_interval(smp, worker_env, interval):
    worker_env(smp.env())
    objs = setup()
    job = Job(Local(_native.Client(), {"FT_SNAPSHOT_INTERVAL": str(interval)}), TrainingState(*objs[:3]))
    job.restore()
    for step in range(7):
        train_step(*objs)
        job.snapshot(step)
    job.client.wait_for_round()
    assert job.client.stats()["last_committed"] == 6  # versions 3 and 6 (steps 2 and 5)
    assert job.snapshots == 2
    job.client.close()


def test_dp_slices_come_back_from_the_peer(smp, tmp_path):
    """Two DP ranks store half of each replicated tensor each; a restarted
    rank gathers the other half from the SMP."""
    import os
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), "dp_worker.py")

    def run(rank, *args, restarts=0):
        env = {k: v for k, v in os.environ.items() if not k.startswith("FT_") or k in ("FT_BIN", "FT_WORKER_LIB")}
        env.update(smp.env(worker=f"w{rank}", rank=rank, size=2, restarts=restarts), FT_TEST_BARRIER_DIR=str(tmp_path))
        return subprocess.Popen([sys.executable, script, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(p):
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        return out.split()

    trained = [finish(p) for p in [run(r, "train", "4") for r in range(2)]]
    assert trained[0][1] == trained[1][1]  # replicated state equal on both ranks
    restored = [finish(run(r, "restore", restarts=1)) for r in range(2)]
    assert restored == trained


def test_external_tensors_go_through_the_slot_protocol(smp, worker_env):
    """The GPU path's protocol (the round's slot, placements, "landed",
    restore buffers) with CPU tensors standing in for device memory: they
    are copied into the slot by ft_torch.cuda's code, not by the library."""
    from ft_torch.cuda import HostCopies

    def external_job(objs):
        state = TrainingState(objs[0], objs[1], objs[2], {"sampler": objs[3]})
        for e in state.entries:
            e.external = e.live  # parameters, buffers and optimizer state: "device" tensors
        state.entries = [e for e in state.entries if not e.external] + [e for e in state.entries if e.external]
        return Job(Local(_native.Client(), {}), state, HostCopies())

    worker_env(smp.env())
    objs = setup()
    job = external_job(objs)
    assert sum(e.external for e in job.state.entries) > 10
    job.restore()
    for step in range(3):
        train_step(*objs)
        job.snapshot(step)
    job.client.wait_for_round()
    digest = job.state_hash()
    job.close()
    job.client.close()

    objs2 = setup(seed=5)
    job2 = external_job(objs2)
    assert job2.restore() == 3
    assert job2.state_hash() == digest
    job2.close()
    job2.client.close()
