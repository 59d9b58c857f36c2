"""Training utilities shared by every model's training script (tokenizer, ECG encoder,
masked transformer, critic): device choice, AdamW with warmup + cosine, EMA weights,
gradient clipping, progress bar, and resumable training state in safetensors + JSON.

A training script owns its loop; these are the parts every loop needs. Typical use:

    device = select_device(args.device)
    optimizer = adamw(model, lr=3e-4)
    ema = Ema(model, decay=0.999)
    state = TrainingState(out_dir)                    # out_dir/train_state.safetensors + .json
    step = state.load(modules={"model": model}, optimizers={"opt": optimizer}, emas={"ema": ema}) if resume else 0
    for step in progress(range(step, total), total, initial=step):
        set_lr(optimizer, warmup_cosine(step, base_lr, warmup, total))
        ...loss.backward(); clip_gradients(model.parameters(), 1.0); optimizer.step(); ema.update(model)
        if (step + 1) % every == 0: state.save(step + 1, modules=..., optimizers=..., emas=...)

The learning rate is a pure function of the step (no scheduler object to save), and the
data order should be one too (e.g. seeds derived from the step), so a resumed run
continues exactly where the interrupted one stopped.
"""
from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checkpoint import load_json, load_optimizer_tensors, load_tensors, optimizer_tensors, save_json, save_tensors
from .errors import CheckpointError

log = logging.getLogger(__name__)

T = TypeVar("T")


# device and seeds


def select_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU; 'cuda' without a GPU is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{name}: CUDA was asked for but no CUDA device is available (torch {torch.__version__})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"{name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# optimizer and schedule


def adamw(
    params: nn.Module | Iterable[nn.Parameter],
    lr: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.99),
) -> torch.optim.AdamW:
    """AdamW over a module's trainable parameters (or an explicit list); matrices decay, vectors do not."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def warmup_cosine(step: int, base_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup from 0 to base_lr over `warmup` steps, then cosine down to min_ratio·base_lr at `total`."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    progress_ = min(1.0, (step - warmup) / span)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress_)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_gradients(parameters: Iterable[Tensor], max_norm: float) -> float:
    """Clip the global gradient norm; returns the norm before clipping (for logging)."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


# EMA


class Ema:
    """Exponential moving average of a module's floating-point state (parameters and buffers).

    `update` every `every` steps with `decay`; a warm-up (decay grows as (1+n)/(10+n))
    keeps the average from being dominated by the random init early in training.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999, every: int = 1) -> None:
        self.decay = decay
        self.every = every
        self.updates = 0
        self.calls = 0
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.calls += 1
        if self.calls % self.every:
            return
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, value in module.state_dict().items():
            if name in self.shadow:
                self.shadow[name].lerp_(value.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Overwrite the module's floating state with the averaged values."""
        module.load_state_dict(self.shadow, strict=False)

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}.{k}": v for k, v in self.shadow.items()}

    def load_tensors(self, tensors: Mapping[str, Tensor], prefix: str) -> None:
        head = f"{prefix}."
        for name, value in tensors.items():
            if name.startswith(head) and name[len(head):] in self.shadow:
                self.shadow[name[len(head):]].copy_(value)

    def meta(self) -> dict[str, int]:
        return {"updates": self.updates, "calls": self.calls}

    def load_meta(self, meta: Mapping[str, int]) -> None:
        self.updates = int(meta.get("updates", 0))
        self.calls = int(meta.get("calls", 0))


# progress


def progress(iterable: Iterable[T], total: int, initial: int = 0, desc: str = "train") -> Iterator[T]:
    """A tqdm bar over the remaining steps; `bar.set_postfix(losses(...))` shows the losses."""
    return tqdm(iterable, total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0)


def losses_postfix(values: Mapping[str, float]) -> dict[str, str]:
    """Short numbers for the progress bar."""
    return {k: f"{v:.3g}" for k, v in values.items()}


# resumable training state


def _embedded_state(path: Path) -> dict[str, Any] | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get("train_state")
    except (SafetensorError, OSError) as err:  # truncated by a full disk or a copy cut short
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    return json.loads(text) if text else None


# settings a resumed run may change: how long it runs, and how it is watched and fed
RESUMABLE = frozenset({"steps", "checkpoint_every", "log_every", "workers"})


def open_run(out: Path, recipe: Mapping[str, Any], resume: bool, name: str = "train_state",
             may_change: frozenset[str] = RESUMABLE) -> None:
    """Before anything is written to `out`: refuse a new run over an existing one, and a
    resume with settings other than the run's (a resumed run that quietly took another
    batch, rate or seed would be neither run; only `may_change` may differ). ValueError /
    FileExistsError with one line; CheckpointError for a state that cannot be read."""
    state = TrainingState(out, name)
    if not state.exists():
        return
    if not resume:
        raise FileExistsError(f"{out} already holds a run; pass --resume or choose another --out")
    saved = state.read_meta().get("extra", {}).get("config", {}).get("recipe")
    if not isinstance(saved, dict):
        return  # a state from before recipes were saved in it: nothing to compare
    now = json.loads(json.dumps(dict(recipe), default=str))  # as it was saved: tuples are lists there
    differ = [key for key, value in now.items() if key in saved and key not in may_change and saved[key] != value]
    if differ:
        settings = ", ".join(f"{key} {saved[key]!r} (now {now[key]!r})" for key in differ)
        raise ValueError(f"{out} was trained with {settings}: a resumed run keeps its settings, only "
                         f"{', '.join(sorted(may_change))} may change; give the run's values or start a new --out")


class TrainingState:
    """Everything needed to resume: module weights, optimizer state, EMA shadows, RNG, step.

    Stored as DIR/NAME.safetensors (all tensors) + DIR/NAME.json (step, optimizer
    hyper-parameters, anything in `extra`). Module and optimizer names are the keys of the
    dicts passed to `save` and `load`, so the same call site restores what it saved.
    """

    def __init__(self, directory: str | Path, name: str = "train_state") -> None:
        self.directory = Path(directory)
        self.name = name

    @property
    def tensors_path(self) -> Path:
        return self.directory / f"{self.name}.safetensors"

    @property
    def json_path(self) -> Path:
        return self.directory / f"{self.name}.json"

    def exists(self) -> bool:
        return self.tensors_path.is_file() and self.json_path.is_file()

    def read_meta(self) -> dict[str, Any]:
        """The saved step, optimizer and EMA settings and `extra`, without the tensors."""
        return _embedded_state(self.tensors_path) or load_json(self.json_path)  # states saved before it was embedded

    def save(
        self,
        step: int,
        modules: Mapping[str, nn.Module] = {},
        optimizers: Mapping[str, torch.optim.Optimizer] = {},
        emas: Mapping[str, Ema] = {},
        extra: Mapping[str, Any] = {},
    ) -> None:
        tensors: dict[str, Tensor] = {}
        meta: dict[str, Any] = {"step": step, "optimizers": {}, "emas": {}, "extra": dict(extra)}
        for name, module in modules.items():
            tensors.update({f"module.{name}.{k}": v for k, v in module.state_dict().items()})
        for name, optimizer in optimizers.items():
            opt_tensors, opt_meta = optimizer_tensors(optimizer, prefix=f"optim.{name}")
            tensors.update(opt_tensors)
            meta["optimizers"][name] = opt_meta
        for name, ema in emas.items():
            tensors.update(ema.tensors(f"ema.{name}"))
            meta["emas"][name] = ema.meta()
        tensors["rng.torch"] = torch.get_rng_state()
        # The description rides inside the tensors file too, so one atomic rename saves the
        # whole state: a crash between two files would pair new weights with an old step.
        save_tensors(tensors, self.tensors_path, metadata={"train_state": json.dumps(meta)})
        save_json(meta, self.json_path)  # for people to read; written last: its presence marks a complete save
        log.info("saved training state at step %d to %s", step, self.tensors_path)

    def load(
        self,
        modules: Mapping[str, nn.Module] = {},
        optimizers: Mapping[str, torch.optim.Optimizer] = {},
        emas: Mapping[str, Ema] = {},
        until: int | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Restore in place; returns (step, extra). Tensors are read to CPU and copied to wherever
        the modules and optimizer parameters live (optimizer step counters stay on CPU).
        `until`: the run's total steps; a state already there says so instead of ending silently."""
        meta = self.read_meta()
        tensors = load_tensors(self.tensors_path)
        for name, module in modules.items():
            head = f"module.{name}."
            module.load_state_dict({k[len(head):]: v for k, v in tensors.items() if k.startswith(head)})
        for name, optimizer in optimizers.items():
            load_optimizer_tensors(optimizer, tensors, meta["optimizers"][name], prefix=f"optim.{name}")
        for name, ema in emas.items():
            ema.load_tensors(tensors, f"ema.{name}")
            ema.load_meta(meta["emas"].get(name, {}))
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"].cpu())
        log.info("resumed from step %d (%s)", meta["step"], self.tensors_path)
        if until is not None and meta["step"] >= until:
            log.warning("%s is already at step %d of %d: nothing to train (raise --steps to go on)",
                        self.tensors_path.parent, meta["step"], until)
        return int(meta["step"]), dict(meta.get("extra", {}))
