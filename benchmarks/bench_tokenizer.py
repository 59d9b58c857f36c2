"""Tokenizer encode/decode time per clip: CPU `tiny` at batch 1 and 8, `paper` on GPU when
CUDA is available (rows skipped otherwise), parameter counts.

Uses the shipped checkpoint core/weights/tiny when present (timing does not depend on
the weights, but it checks the shipped file loads), else a freshly initialised model.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from echopulse.core.config import paper, tiny
from echopulse.core.tokenizer import CViViT, count_parameters, load_tokenizer

WEIGHTS = Path(__file__).resolve().parent.parent / "core" / "weights" / "tiny"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _time_ms(model: CViViT, batch: int, repeats: int, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """Median (encode, decode) milliseconds per clip over `repeats` timed runs after a warm-up."""
    cfg = model.config
    video = torch.rand(batch, cfg.channels, cfg.frames, cfg.image_size, cfg.image_size, device=device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        indices = model.encode(video)
        model.decode_indices(indices)
        enc, dec = [], []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            indices = model.encode(video)
            _sync(device)
            t1 = time.perf_counter()
            model.decode_indices(indices)
            _sync(device)
            enc.append((t1 - t0) * 1000 / batch)
            dec.append((time.perf_counter() - t1) * 1000 / batch)
    return statistics.median(enc), statistics.median(dec)


def run(quick: bool, gpu_only: bool = False) -> dict:
    rows = []
    cpu = torch.device("cpu")
    if (WEIGHTS / "tokenizer.json").is_file():
        model, _ = load_tokenizer(WEIGHTS)
        source = "shipped checkpoint"
    else:
        model, source = CViViT(tiny().tokenizer).eval(), "random init"
    if not gpu_only:  # on a lent GPU box the CPU rows would describe that box's CPU
        rows.append({"metric": "tiny tokenizer parameters", "value": count_parameters(model), "unit": "params", "target": None})
        # One thread: on a shared 2-core machine, two threads spin against each other and the
        # other jobs (batch-1 timings were 100x worse with 2 threads under load).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for batch in (1, 8):
                enc, dec = _time_ms(model, batch, repeats=3 if quick else 20, device=cpu)
                rows.append({"metric": f"tiny encode, CPU 1 thread, batch {batch}", "value": enc, "unit": "ms/clip", "target": None})
                rows.append({"metric": f"tiny decode, CPU 1 thread, batch {batch}", "value": dec, "unit": "ms/clip", "target": None})
        finally:
            torch.set_num_threads(threads)
    paper_model = CViViT(paper().tokenizer)
    rows.append({"metric": "paper tokenizer parameters", "value": count_parameters(paper_model), "unit": "params", "target": None})
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        paper_model = paper_model.to(gpu).eval()
        for batch in (1, 8):
            for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
                enc, dec = _time_ms(paper_model, batch, repeats=5 if quick else 30, device=gpu, dtype=dtype)
                rows.append({"metric": f"paper encode, GPU {label}, batch {batch}", "value": enc, "unit": "ms/clip", "target": None})
                rows.append({"metric": f"paper decode, GPU {label}, batch {batch}", "value": dec, "unit": "ms/clip", "target": None})
    return {"rows": rows, "tiny_weights": source, "torch_threads_tiny": 1, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
