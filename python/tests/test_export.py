"""`ftctl export`: a persisted step (three nodes, RS(2+1), one node's image
damaged and decoded from parity) exported to safetensors and read back with
the real `safetensors` package, every tensor compared with the whole tensor
it was built from.

The fixture is written by the Swift test `ExportTests/pythonFixture` when
FT_EXPORT_FIXTURE_DIR is set (the default here is .build/export-fixture):

    FT_EXPORT_FIXTURE_DIR=$PWD/.build/export-fixture swift test --skip-build --filter ExportTests/pythonFixture
    FT_EXPORT_FIXTURE_DIR=$PWD/.build/export-fixture python3 -m pytest -q python/tests/test_export.py

FIXTURE/persist is the persist directory, FIXTURE/expected.json lists every
exported tensor (safetensors dtype, shape, role, and FIXTURE/expected/<i>.bin
with its raw little-endian bytes). Skipped only when safetensors (or numpy)
is not installed; a missing fixture is a failure.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest

np = pytest.importorskip("numpy")
st_numpy = pytest.importorskip("safetensors.numpy")
import safetensors  # noqa: E402  (importable once the line above passed)

ROOT = pathlib.Path(__file__).resolve().parents[2]

NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
         "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def ftctl() -> pathlib.Path:
    """FT_BIN/ftctl, else the newest of .build/debug and .build/release."""
    if os.environ.get("FT_BIN"):
        path = pathlib.Path(os.environ["FT_BIN"]) / "ftctl"
    else:
        found = [d / "ftctl" for d in (ROOT / ".build/debug", ROOT / ".build/release") if (d / "ftctl").exists()]
        if not found:
            pytest.fail(f"no ftctl built under {ROOT}/.build: run swift build first")
        path = max(found, key=lambda p: p.stat().st_mtime)
    if not path.exists():
        pytest.fail(f"no ftctl at {path}")
    return path


@pytest.fixture(scope="module")
def fixture() -> pathlib.Path:
    d = pathlib.Path(os.environ.get("FT_EXPORT_FIXTURE_DIR") or ROOT / ".build/export-fixture")
    if not (d / "expected.json").exists() or not (d / "persist").is_dir():
        pytest.fail(f"no export fixture at {d} (expected.json and persist/): write it first with\n"
                    f"  FT_EXPORT_FIXTURE_DIR={d} swift test --skip-build --filter ExportTests/pythonFixture")
    return d


@pytest.fixture(scope="module")
def expected(fixture) -> dict:
    return json.loads((fixture / "expected.json").read_text())


def export(fixture: pathlib.Path, out: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ftctl()), "export", "--from", str(fixture / "persist"), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=120)


def test_every_tensor_reads_back_whole_with_safetensors(fixture, expected, tmp_path):
    out = tmp_path / "model.safetensors"
    run = export(fixture, out)
    assert run.returncode == 0, run.stdout + run.stderr
    names = expected["tensors"]
    assert f"step {expected['step']}" in run.stdout
    assert f"{len(names)} tensors" in run.stdout
    assert "n1 decoded from parity" in run.stdout
    assert "decoding" in run.stderr, "the loader's note about the damaged part goes to stderr"

    loaded = st_numpy.load_file(str(out))
    assert sorted(loaded) == sorted(names)
    for name, want in names.items():
        got = loaded[name]
        assert got.dtype == NUMPY[want["dtype"]], name
        assert list(got.shape) == want["shape"], name
        raw = (fixture / want["file"]).read_bytes()
        # Bytes, not values: equal bit patterns (no NaN != NaN), and the byte order checked too.
        assert got.tobytes() == raw, f"{name}: not the whole tensor"
        assert np.array_equal(got, np.frombuffer(raw, dtype=NUMPY[want["dtype"]]).reshape(want["shape"]), equal_nan=got.dtype.kind == "f")

    # Per-rank tensors once per rank; replicated ones whole, once.
    assert {n for n in names if n.startswith("rng@rank")} == {f"rng@rank{r}" for r in range(6)}
    assert "params" in names and not any(n.startswith("params@") for n in names)

    with safetensors.safe_open(str(out), framework="numpy") as f:
        meta = f.metadata()
    assert meta["step"] == str(expected["step"])
    assert meta["job"] == expected["job"]

    side = json.loads((tmp_path / "model.safetensors.json").read_text())
    assert side["step"] == expected["step"]
    assert side["job"] == expected["job"]
    assert pathlib.Path(side["persist_dir"]) == (fixture / "persist").resolve()
    assert side["decoded_nodes"] == ["n1"]
    assert sorted(side["tensors"]) == sorted(names)
    for name, want in names.items():
        t = side["tensors"][name]
        assert t["role"] == want["role"], name
        assert t["safetensors_dtype"] == want["dtype"], name
        assert t["shape"] == want["shape"], name
        assert t["bytes"] == len((fixture / want["file"]).read_bytes()), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "model.safetensors.json"]


def test_torch_reads_it_too(fixture, expected, tmp_path):
    torch_st = pytest.importorskip("safetensors.torch")
    out = tmp_path / "model.safetensors"
    assert export(fixture, out, "--step", str(expected["step"])).returncode == 0
    tensors = torch_st.load_file(str(out))
    want = expected["tensors"]["emb"]
    assert list(tensors["emb"].shape) == want["shape"]
    assert tensors["emb"].numpy().tobytes() == (fixture / want["file"]).read_bytes()


def test_failure_is_one_line_and_writes_nothing(fixture, tmp_path):
    out = tmp_path / "model.safetensors"
    run = export(fixture, out, "--step", "999999")
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "step_not_found" in lines[0] and "999999" in lines[0], run.stderr
    assert list(tmp_path.iterdir()) == []


def test_help_explains_it():
    run = subprocess.run([str(ftctl()), "export", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0
    assert "safetensors" in run.stdout and "--from" in run.stdout and "@rank" in run.stdout
