"""What only a GPU runs, exercised on the CPU, so a lent GPU's few minutes are not spent
finding it broken.

- The resident generator's CuPy path (`kernels="cupy"`: positions handed from remask to the
  next step, the kernels' buffers, a critic's confidence into the remask kernel) runs here
  with `FusedKernels` launching the kernels' own source compiled for the host
  (`test_cuda_source_on_host.HostKernels`), against the torch path.
- The same path on the meta device: no host sync and no host tensor, so it can be captured.
- `benchmarks/gpu.sh` parses, and without a usable GPU stops with a clear message, having
  installed nothing.
- The GPU test modules import as they would on a GPU box (no stale project names).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from echopulse.core.critic import TokenCritic
from echopulse.core.generator import Generator
from echopulse.core.resident import BeatRequest, ResidentGenerator, precision_report
from echopulse.kernels import cupy_kernels

from _generator_fixtures import resident_requests, small_preset
from test_cuda_source_on_host import CXX, HostKernels, build_host_library

ROOT = Path(__file__).resolve().parent.parent
GPU_SH = ROOT / "benchmarks" / "gpu.sh"


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    if CXX is None:
        pytest.skip("no C++ compiler (g++/clang++) to build the host harness")
    return build_host_library(tmp_path_factory.mktemp("resident_host"))


def _cupy_path(gen: Generator, kernels: HostKernels) -> ResidentGenerator:
    """The resident generator as `kernels="cupy"` builds it, with the host-run kernels:
    set before any buffer exists, so the per-step position buffers are allocated."""
    res = ResidentGenerator(gen, pad=True)
    res.kernels, res.kernel_kind = kernels, "cupy"
    return res


def _requests(res: ResidentGenerator, count: int, seed: int = 0, priming: str = "loop") -> list[BeatRequest]:
    return resident_requests(res, count, seed, priming)


@pytest.mark.parametrize("count,priming", [(1, "loop"), (3, "loop"), (2, "image")])  # dense, masked, no_ref
def test_the_cupy_path_gives_the_torch_paths_beats(lib: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch, count: int,
                                                   priming: str) -> None:
    monkeypatch.setattr(cupy_kernels, "TENSOR_DEVICE", "cpu")
    gen = Generator.untrained(small_preset(), device="cpu", seed=4)
    torch_path = ResidentGenerator(gen, pad=True)
    kernels = HostKernels(lib)
    cupy_path = _cupy_path(gen, kernels)
    requests = _requests(torch_path, count, seed=count, priming=priming)
    report = precision_report(torch_path, cupy_path, requests)
    # the same hash noise and ranking; only a last-bit log() difference could flip a near tie
    assert report["token_agreement"] >= 0.97, report
    assert report["decode_pixel_max"] == 0, report  # LFQ and frames kernels are exact
    steps = cupy_path.steps
    # one beat, then `decode_tokens` of the reference's tokens (LFQ + frames only)
    assert kernels.launches == ["sample_confidence", "remask"] * steps + ["lfq_codes", "frames_uint8"] * 2
    buf = cupy_path.buffers(4 if count > 2 else count, 1)
    assert [tuple(p.shape) for p in buf.positions] == [(buf.batch, u) for u in cupy_path.unknown_counts]


def test_the_cupy_path_with_a_critic_gives_the_torch_paths_beats(lib: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> None:
    """The critic's confidence, not the log-probability, goes into the remask kernel."""
    monkeypatch.setattr(cupy_kernels, "TENSOR_DEVICE", "cpu")
    p = small_preset()
    gen = Generator.untrained(p, device="cpu", seed=6)
    torch.manual_seed(6)
    gen.critic = TokenCritic(p.transformer, p.tokenizer, p.ecg.dim).eval()
    torch_path = ResidentGenerator(gen, pad=True)
    kernels = HostKernels(lib)
    report = precision_report(torch_path, _cupy_path(gen, kernels), _requests(torch_path, 3, seed=2))
    assert report["token_agreement"] >= 0.97, report
    assert kernels.launches.count("remask") == torch_path.steps


class _HostReads(TorchDispatchMode):
    """Records every op that reads a CPU tensor while the model runs on another device."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in [*args, *(kwargs or {}).values()]):
            self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", ["masked", "dense", "no_ref"])
def test_the_cupy_path_has_no_host_sync_so_it_can_be_captured(monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """tests/test_resident.py checks the torch path this way; here the kernels' glue (their
    argument checks, the position buffers, the step loop) runs on the meta device, which
    refuses every data-dependent host operation, with launches checked but not run."""
    monkeypatch.setattr(cupy_kernels, "TENSOR_DEVICE", "meta")
    gen = Generator.untrained(small_preset(), device="cpu")
    for module in (gen.tokenizer, gen.ecg_encoder, gen.transformer):
        module.to("meta")
    gen.device = torch.device("meta")
    kernels = HostKernels(library=None)
    res = _cupy_path(gen, kernels)
    buf = res.buffers(3, 2)
    spy = _HostReads()
    with torch.inference_mode(), spy:
        res.pipeline(buf, layout=layout)
    assert not spy.ops, f"host tensors read inside the pipeline by {sorted(spy.ops)}"
    assert kernels.launches == ["sample_confidence", "remask"] * res.steps + ["lfq_codes", "frames_uint8"]


# benchmarks/gpu.sh


def test_gpu_sh_parses() -> None:
    proc = subprocess.run(["bash", "-n", str(GPU_SH)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_gpu_sh_has_no_shellcheck_warnings() -> None:
    proc = subprocess.run(["shellcheck", "-S", "warning", str(GPU_SH)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


def _tool(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _dry_run(tmp_path: Path, nvidia_smi: str, args: tuple[str, ...] = ("gpu-out",),
             **env_vars: str) -> tuple[subprocess.CompletedProcess, str]:
    """gpu.sh with a stand-in nvidia-smi and a python that records its calls and refuses pip
    (so no run of this test can install anything); returns the run and the calls."""
    tools = tmp_path / "bin"
    tools.mkdir()
    calls = tmp_path / "calls.log"
    _tool(tools, "nvidia-smi", nvidia_smi)
    _tool(tools, "python-spy", f'echo "$*" >> "{calls}"\n'
          f'[ "$1 $2" = "-m pip" ] && exit 1\nexec "{sys.executable}" "$@"\n')
    env = {**os.environ, "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(tools / "python-spy")}
    for name in ("OUT", "BUDGET_S", "TEST_TIMEOUT", "BENCH_TIMEOUT"):
        env.pop(name, None)
    env.update(env_vars)
    # OUT_DIR given relative: to where the script is called from, not to the repo it moves to
    proc = subprocess.run(["bash", str(GPU_SH), *args], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    return proc, calls.read_text() if calls.exists() else ""


def test_gpu_sh_without_a_gpu_stops_with_a_clear_message(tmp_path: Path) -> None:
    proc, _ = _dry_run(tmp_path, "exit 9\n")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no NVIDIA GPU visible" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert (tmp_path / "gpu-out").is_dir() and not (ROOT / "gpu-out").exists()


def test_gpu_sh_takes_a_relative_out_from_where_it_is_called_too(tmp_path: Path) -> None:
    """$OUT, like the argument, names a folder relative to the caller's directory; it was
    taken relative to the repository the script moves to (a stray folder in the tree)."""
    name = f"gpu-out-env-{os.getpid()}"
    try:
        proc, _ = _dry_run(tmp_path, "exit 9\n", args=(), OUT=name)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert (tmp_path / name).is_dir() and not (ROOT / name).exists()
    finally:
        if (ROOT / name).is_dir():
            (ROOT / name).rmdir()


@pytest.mark.parametrize("limit", ["BUDGET_S", "TEST_TIMEOUT", "BENCH_TIMEOUT"])
@pytest.mark.parametrize("value", ["9m", "570.5", "0", "-5"])
def test_gpu_sh_refuses_time_limits_that_are_not_whole_seconds(tmp_path: Path, limit: str, value: str) -> None:
    """The budget is bash arithmetic: '9m' gave every step an empty limit (`timeout ''`
    fails at once, so no test and no benchmark ran), '0' a one-second one. Refused first,
    before any install."""
    proc, calls = _dry_run(tmp_path, 'echo "GPU 0: NVIDIA Stand-in (UUID: GPU-0)"\n', **{limit: value})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{limit} must be a whole number of seconds" in proc.stdout
    assert calls == "", calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot use a GPU")
def test_gpu_sh_with_a_cpu_torch_stops_and_installs_nothing(tmp_path: Path) -> None:
    """A GPU but a torch without CUDA: stop, saying how to get one; never replace the
    environment's torch unasked (the lent box is offline, a developer's machine is theirs)."""
    proc, calls = _dry_run(tmp_path, 'echo "GPU 0: NVIDIA Stand-in (UUID: GPU-0)"\n')
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "torch cannot use the GPU" in proc.stdout and "INSTALL_TORCH=1" in proc.stdout
    assert "-m pip" not in calls, calls
    assert "Traceback" not in proc.stdout + proc.stderr


# the GPU tests themselves: skipped here, so a stale import would surface only on a GPU


@pytest.mark.parametrize("name", ["test_gpu_kernels", "test_gpu_graph"])
def test_the_gpu_test_modules_import_as_on_a_gpu(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Imported as a GPU box imports them (CUDA and CuPy reported present): every name they
    import from the project exists, and their tests are there to collect."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: object() if mod == "cupy" else real_find_spec(mod, *a))
    spec = importlib.util.spec_from_file_location(f"gpu_readiness_{name}", ROOT / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = [t for t in vars(module) if t.startswith("test_")]
    assert len(tests) >= 5 and all(callable(getattr(module, t)) for t in tests)
