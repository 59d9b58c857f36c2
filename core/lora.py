"""LoRA: low-rank adapters on chosen Linear layers (Hu et al. 2021).

y = W x + b + (α / r) · B A x, with A (r × in) random and B (out × r) zero at the start,
so a freshly wrapped model computes exactly what it did before. Only A and B train.
`merge_lora` folds the update into W for adapter-free inference; `unmerge_lora` takes it
out again, bit for bit (the layer keeps W while merged: W + ΔW − ΔW is not W in floating
point). Adapters are saved alone (a per-patient fine-tune is a small file); loading one
replaces every adapter and the scale of a model already wrapped, so one patient's file
never runs with another's leftovers.

Layers are chosen by fnmatch patterns over module names, e.g. "*.to_q", "encoder.*.ff.up".
"""
from __future__ import annotations

import fnmatch
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from .checkpoint import load_json, load_tensors, save_json, save_tensors

DEFAULT_TARGETS = ("*.to_q", "*.to_kv", "*.to_out")  # attention projections


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError("LoRA rank must be at least 1")
        self.base = base
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False
        # W as it was before `merge`, while merged; a buffer so it follows .to(device)
        self.register_buffer("unmerged_weight", None, persistent=False)
        base.requires_grad_(False)

    def delta(self) -> Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.merged:
            return out
        return out + (x @ self.lora_A.T @ self.lora_B.T) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.unmerged_weight = self.base.weight.detach().clone()
            self.base.weight += self.delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W exactly (subtracting the update again would leave rounding errors)."""
        if self.merged:
            self.base.weight.copy_(self.unmerged_weight)
            self.unmerged_weight = None
            self.merged = False


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def apply_lora(model: nn.Module, rank: int, targets: Sequence[str] = DEFAULT_TARGETS, alpha: float | None = None) -> list[str]:
    """Wrap every nn.Linear whose name matches a pattern; freeze everything else. Returns the wrapped names."""
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and _matches(name, targets):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRALinear(module, rank, alpha))
            wrapped.append(name)
    if not wrapped:
        raise ValueError(f"no Linear layer matches {list(targets)}")
    return wrapped


def lora_layers(model: nn.Module) -> Iterable[tuple[str, LoRALinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, m in lora_layers(model) for p in (m.lora_A, m.lora_B)]


def merge_lora(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Adapter tensors only, named by their layer: '<layer>.lora_A', '<layer>.lora_B'."""
    state = {}
    for name, layer in lora_layers(model):
        state[f"{name}.lora_A"] = layer.lora_A.detach()
        state[f"{name}.lora_B"] = layer.lora_B.detach()
    return state


def save_lora(model: nn.Module, directory: str | Path, name: str = "lora", **meta: Any) -> None:
    """DIR/NAME.safetensors (adapters alone) + DIR/NAME.json (rank, alpha scale, layers, `meta`)."""
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("model has no LoRA layers")
    info = {"kind": "lora", "rank": layers[0][1].rank, "scale": layers[0][1].scale, "layers": [n for n, _ in layers], **meta}
    directory = Path(directory)
    save_tensors(lora_state_dict(model), directory / f"{name}.safetensors")
    save_json(info, directory / f"{name}.json")


@torch.no_grad()
def load_lora(model: nn.Module, directory: str | Path, name: str = "lora") -> dict[str, Any]:
    """Wrap the layers the adapter file names (if the model has no LoRA layers yet) and load
    its tensors and scale. Returns its JSON. A model already wrapped must have exactly the
    file's layers, unmerged; it is checked whole before anything is overwritten (ValueError)."""
    directory = Path(directory)
    info = load_json(directory / f"{name}.json")
    tensors = load_tensors(directory / f"{name}.safetensors")
    adapters = _adapters_by_layer(tensors)
    rank, scale = int(info["rank"]), float(info["scale"])
    if not any(True for _ in lora_layers(model)):
        _check_adapters_fit_linear(model, adapters, rank)  # before wrapping: a refused file changes nothing
        apply_lora(model, rank, targets=sorted(adapters))
    layers = dict(lora_layers(model))
    _check_adapters_fit(layers, adapters)
    for layer_name, layer in layers.items():
        layer.lora_A.copy_(adapters[layer_name]["lora_A"])
        layer.lora_B.copy_(adapters[layer_name]["lora_B"])
        layer.scale = scale  # the file's, also over a model wrapped before with another alpha
    return info


def _adapters_by_layer(tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """'<layer>.lora_A' / '<layer>.lora_B' tensors grouped by layer; both must be there."""
    adapters: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        layer_name, _, param = key.rpartition(".")
        if param not in ("lora_A", "lora_B") or not layer_name:
            raise ValueError(f"{key!r} is not a LoRA adapter tensor (<layer>.lora_A or <layer>.lora_B)")
        adapters.setdefault(layer_name, {})[param] = tensor
    incomplete = sorted(n for n, pair in adapters.items() if len(pair) != 2)
    if incomplete:
        raise ValueError(f"adapter for {incomplete[0]!r} lacks lora_A or lora_B")
    return adapters


def _check_adapters_fit_linear(model: nn.Module, adapters: dict[str, dict[str, Tensor]], rank: int) -> None:
    """Every adapter names a Linear layer of `model` and has the shapes of rank `rank` on it."""
    linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for layer_name, pair in sorted(adapters.items()):
        module = linear.get(layer_name)
        if module is None:
            raise ValueError(f"adapter for {layer_name!r} but the model has no such Linear layer")
        want = {"lora_A": (rank, module.in_features), "lora_B": (module.out_features, rank)}
        for param, shape in want.items():
            if tuple(pair[param].shape) != shape:
                raise ValueError(f"{layer_name}.{param}: the file has shape {tuple(pair[param].shape)}, "
                                 f"the layer needs {shape} (another rank or model)")


def _check_adapters_fit(layers: dict[str, LoRALinear], adapters: dict[str, dict[str, Tensor]]) -> None:
    """Every adapter has its layer and every layer its adapter, with matching shapes, none merged."""
    missing = sorted(set(adapters) - set(layers))
    if missing:
        raise ValueError(f"adapter for {missing[0]!r} but the model has no such LoRA layer")
    extra = sorted(set(layers) - set(adapters))
    if extra:
        raise ValueError(f"the model's LoRA layer {extra[0]!r} has no adapter in the file: it would keep its old one")
    for layer_name, layer in layers.items():
        if layer.merged:
            raise ValueError("unmerge LoRA before loading new adapters")
        for param in ("lora_A", "lora_B"):
            want, got = tuple(getattr(layer, param).shape), tuple(adapters[layer_name][param].shape)
            if want != got:
                raise ValueError(f"{layer_name}.{param}: the file has shape {got}, the layer {want} (another rank or model)")
