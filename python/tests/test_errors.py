"""Bad input gets a clear exception naming the tensor; nothing is half-registered."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from ft_torch import _native
from ft_torch.job import Job, NotAttachedError
from ft_torch.session import Local
from ft_torch.state import StateError, TrainingState


def model_and_optimizer():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    return m, torch.optim.AdamW(m.parameters())


def restored_job(smp, worker_env):
    """A job of a small model under `smp`, restored (fresh)."""
    worker_env(smp.env())
    m, opt = model_and_optimizer()
    job = Job(Local(_native.Client(), {}), TrainingState(m, opt))
    job.restore()
    return job, m, opt


def test_non_contiguous_tensor_is_named():
    m, _ = model_and_optimizer()
    m[0].weight = torch.nn.Parameter(torch.randn(4, 3).t())
    with pytest.raises(StateError, match=r"'model\.0\.weight' is not contiguous"):
        TrainingState(m, None)


def test_unsupported_dtype_is_named():
    m, _ = model_and_optimizer()
    m[1].register_buffer("codes", torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(StateError, match=r"'model\.1\.codes' has dtype torch.complex64, which is not supported"):
        TrainingState(m, None)


def test_a_tensor_registered_twice_is_named():
    m, opt = model_and_optimizer()
    with pytest.raises(StateError, match=r"'extra\.w' shares its memory with|'model\.0\.weight' shares its memory with 'extra\.w'"):
        TrainingState(m, opt, extras={"w": m[0].weight.data})


def test_unknown_extra_is_refused():
    m, opt = model_and_optimizer()
    with pytest.raises(StateError, match=r"extra 'position' is a int"):
        TrainingState(m, opt, extras={"position": 3})


def test_shape_or_dtype_change_between_snapshots_is_named(smp, worker_env):
    job, m, _ = restored_job(smp, worker_env)
    job.snapshot(0)
    m[1].bias = torch.nn.Parameter(torch.zeros(5))
    with pytest.raises(StateError, match=r"'model\.1\.bias' changed from float32\[2\] to float32\[5\]"):
        job.snapshot(1)
    m[1].bias = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(StateError, match=r"'model\.1\.bias' changed from float32\[2\] to float64\[2\]"):
        job.snapshot(2)
    m[1].bias = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(StateError, match=r"'model\.1\.bias' moved to other memory"):
        job.snapshot(3)
    job.client.close()


def test_optimizer_state_replaced_is_named(smp, worker_env):
    job, _, opt = restored_job(smp, worker_env)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # new tensors in the optimizer's state
    with pytest.raises(StateError, match=r"'optimizer\.0\.weight\.step' moved to other memory"):
        job.snapshot(0)
    job.client.close()


def test_snapshot_steps_must_increase(smp, worker_env):
    job, _, _ = restored_job(smp, worker_env)
    job.snapshot(4)
    with pytest.raises(ValueError, match="snapshot step 4 is not after the last one"):
        job.snapshot(4)
    job.client.close()


def test_nothing_is_half_registered(smp, worker_env):
    """A refused attach registers nothing: the next good one is the first."""
    worker_env(smp.env())
    client = _native.Client()
    with pytest.raises(_native.FTError) as e:
        client.register([("a", "float32", [2], "param", 0, None)])  # NULL data for 8 bytes
    assert e.value.code == "FT_E_INVALID_ARGUMENT" and "'a'" in e.value.message
    buf = torch.zeros(2)
    with pytest.raises(_native.FTError, match="'b' is already in this registration"):
        client.register([("b", "float32", [2], "param", 0, buf.data_ptr()), ("b", "float32", [2], "param", 0, buf.data_ptr())])
    assert smp.segments() == []  # the SMP was never asked
    m, opt = model_and_optimizer()
    job = Job(Local(client, {}), TrainingState(m, opt))
    assert job.committed_at_register is None
    assert len(smp.segments()) == 2
    client.close()


def test_register_twice_on_one_client(smp, worker_env):
    worker_env(smp.env())
    client = _native.Client()
    buf = torch.zeros(2)
    client.register([("b", "float32", [2], "param", 0, buf.data_ptr())])
    with pytest.raises(_native.FTError, match="register called twice") as e:
        client.register([("b", "float32", [2], "param", 0, buf.data_ptr())])
    assert e.value.code == "FT_E_MISUSE"
    client.close()


def test_module_api_attach_twice_and_snapshot_before_attach(smp, worker_env, fresh_module):
    worker_env(smp.env())
    ft = fresh_module
    with pytest.raises(NotAttachedError, match="no job is attached"):
        ft.snapshot(0)
    m, opt = model_and_optimizer()
    job = ft.attach(m, opt)
    with pytest.raises(StateError, match=r"'model\.0\.weight' is already registered: attach was called twice"):
        ft.attach(m, opt)
    job.restore()
    ft.snapshot(0)
    job.finish()
    with pytest.raises(NotAttachedError):
        ft.snapshot(1)
    ft._session.client.close()


def test_without_ft_smp_training_is_unprotected_with_one_warning(worker_env, fresh_module):
    ft = fresh_module
    m, opt = model_and_optimizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ft.start()
        job = ft.attach(m, opt)
        ft.start()
    assert [str(w.message) for w in caught] == [
        "ft_torch: training unprotected (not started by ft-smp: missing FT_JOB_ID, FT_WORKER_ID, FT_DP_RANK, "
        "FT_DP_SIZE, FT_SMP_ENDPOINT)"]
    assert job.restore() == 0
    for step in range(3):
        job.snapshot(step)
    job.finish()
