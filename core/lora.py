"""LoRA: low-rank adapters on chosen Linear layers (Hu et al. 2021).

y = W x + b + (α / r) · B A x, with A (r × in) random and B (out × r) zero at the start,
so a freshly wrapped model computes exactly what it did before. Only A and B train.
`merge_lora` folds the update into W for adapter-free inference; `unmerge_lora` takes it
out again. Adapters are saved alone (a per-patient fine-tune is a small file).

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
            self.base.weight += self.delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta()
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
    """Wrap the layers the adapter file names (if not yet wrapped) and load its tensors. Returns its JSON."""
    directory = Path(directory)
    info = load_json(directory / f"{name}.json")
    tensors = load_tensors(directory / f"{name}.safetensors")
    if not any(True for _ in lora_layers(model)):
        rank = int(info["rank"])
        apply_lora(model, rank, targets=info["layers"], alpha=float(info["scale"]) * rank)
    layers = dict(lora_layers(model))
    for key, tensor in tensors.items():
        layer_name, _, param = key.rpartition(".")
        if layer_name not in layers:
            raise KeyError(f"adapter for {layer_name!r} but the model has no such LoRA layer")
        layer = layers[layer_name]
        if layer.merged:
            raise RuntimeError("unmerge LoRA before loading new adapters")
        getattr(layer, param).copy_(tensor)
    return info
