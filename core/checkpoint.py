"""Checkpoints as safetensors + JSON: weights, optimizer state and run metadata.

Nothing here unpickles: weights and optimizer tensors live in `.safetensors` files, and
everything else (preset, step, optimizer hyper-parameters) in JSON. Writes go to a
temporary file first and are renamed into place, so an interrupted save never leaves a
half-written checkpoint behind.

Layout of a model checkpoint in a directory DIR with name NAME:

    DIR/NAME.safetensors   the module's state dict (optionally stored as fp16)
    DIR/NAME.json          {"preset": {...}, ...any metadata the caller adds}
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import Preset
from .errors import CheckpointError


# helpers


def _atomic_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def save_tensors(tensors: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors to a safetensors file atomically (contiguous CPU copies, no shared storage)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    tmp = _atomic_path(path)
    save_file(flat, str(tmp), metadata=dict(metadata or {}))
    os.replace(tmp, path)


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Read every tensor of a safetensors file onto `device`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as err:  # truncated by a full disk or a copy cut short
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def save_json(data: Mapping[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_path(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def load_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint config at {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: a JSON {type(data).__name__}, not an object")
    return data


def load_preset(path: str | Path, kind: str | None = None) -> Preset:
    """The preset a model's JSON carries; with `kind`, refuse a JSON of another kind of model."""
    data = load_json(path)
    if kind is not None and data.get("kind", kind) != kind:
        raise CheckpointError(f"{path}: a {data['kind']} checkpoint, not a {kind}")
    try:
        return Preset.from_dict(data["preset"])
    except (KeyError, TypeError) as err:  # no preset, or fields of another version
        raise CheckpointError(f"{path}: no usable preset ({type(err).__name__}: {err})") from None


# modules


def save_module(module: nn.Module, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Save a module's state dict; floating tensors are cast to `dtype` when given (e.g. fp16 to ship)."""
    state = module.state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_tensors(state, path)


def load_module(module: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load weights into `module`, casting each tensor to the dtype and device the module already has."""
    own = module.state_dict()
    loaded = load_tensors(path)
    _check_fit(own, loaded, path, strict)
    state = {}
    for name, tensor in loaded.items():
        target = own.get(name)
        state[name] = tensor.to(dtype=target.dtype, device=target.device) if target is not None else tensor
    module.load_state_dict(state, strict=strict)
    return module


def _check_fit(own: Mapping[str, Tensor], loaded: Mapping[str, Tensor], path: Path | str, strict: bool) -> None:
    """One line on what does not fit, instead of torch's list of every tensor."""
    wrong = [n for n, t in loaded.items() if n in own and tuple(t.shape) != tuple(own[n].shape)]
    missing = [n for n in own if n not in loaded] if strict else []
    extra = [n for n in loaded if n not in own] if strict else []
    if wrong:
        n = wrong[0]
        raise CheckpointError(f"{path}: {len(wrong)} tensor(s) of another shape, e.g. {n}: {tuple(loaded[n].shape)} in the file, "
                              f"{tuple(own[n].shape)} in the model its JSON describes")
    if missing or extra:
        parts = [f"{len(names)} {what} (e.g. {names[0]})" for what, names in (("missing", missing), ("unexpected", extra)) if names]
        raise CheckpointError(f"{path}: tensors {', '.join(parts)}: weights of another model?")


def save_model(directory: str | Path, name: str, module: nn.Module, config: Mapping[str, Any], dtype: torch.dtype | None = None) -> None:
    """DIR/NAME.safetensors + DIR/NAME.json (the JSON carries the preset and anything else in `config`)."""
    directory = Path(directory)
    save_module(module, directory / f"{name}.safetensors", dtype=dtype)
    save_json(config, directory / f"{name}.json")


def model_paths(directory: str | Path, name: str) -> tuple[Path, Path]:
    """(weights, config) paths of a model checkpoint."""
    directory = Path(directory)
    return directory / f"{name}.safetensors", directory / f"{name}.json"


# optimizers: state tensors in safetensors, hyper-parameters in the metadata as JSON


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optim") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Flatten an optimizer's state dict into named tensors plus a JSON-able description."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}.{index}.{key}"] = value
            else:  # plain numbers (e.g. a step counter kept as float)
                scalars.setdefault(str(index), {})[key] = value
    meta = {"param_groups": state_dict["param_groups"], "scalars": scalars}
    return tensors, meta


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, Tensor], meta: Mapping[str, Any], prefix: str = "optim"
) -> None:
    """Inverse of `optimizer_tensors`: rebuild the state dict and load it."""
    state: dict[int, dict[str, Any]] = {}
    head = f"{prefix}."
    for name, tensor in tensors.items():
        if not name.startswith(head):
            continue
        index, key = name[len(head):].split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
