"""LoRA: exact merge/unmerge, adapters-only training, adapters saved and loaded alone."""
from __future__ import annotations

import copy

import torch

from echopulse.core.config import TokenizerConfig
from echopulse.core.lora import LoRALinear, apply_lora, load_lora, lora_parameters, merge_lora, save_lora, unmerge_lora
from echopulse.core.tokenizer import CViViT


def _model() -> CViViT:
    torch.manual_seed(0)
    return CViViT(TokenizerConfig(dim=64, spatial_depth=1, temporal_depth=1, heads=2, dim_head=32)).eval()


def _randomise_adapters(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.05)


def test_wrapping_changes_nothing_and_freezes_the_base() -> None:
    model = _model()
    codes = torch.randint(0, 2, (1, 6, 8, 8, 10)).float() * 2 - 1
    before = model.decode(codes)
    wrapped = apply_lora(model, rank=4)
    assert wrapped and all(name.endswith(("to_q", "to_kv", "to_out")) for name in wrapped)
    assert torch.equal(model.decode(codes), before)  # B = 0 at init
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_merge_and_unmerge_are_exact() -> None:
    model = _model()
    base = copy.deepcopy(model.state_dict())
    apply_lora(model, rank=4, targets=["*.to_q", "*.to_kv", "*.to_out", "*.ff.up", "to_bits"])
    _randomise_adapters(model)
    video = torch.rand(2, 1, 11, 64, 64)
    with torch.no_grad():
        unmerged = model.decode(model.quantizer.indices_to_codes(model.encode(video)))
        merge_lora(model)
        assert all(layer.merged for layer in model.modules() if isinstance(layer, LoRALinear))
        merged = model.decode(model.quantizer.indices_to_codes(model.encode(video)))
        unmerge_lora(model)
        again = model.decode(model.quantizer.indices_to_codes(model.encode(video)))
    assert torch.allclose(merged, unmerged, atol=1e-5)
    assert torch.allclose(again, unmerged, atol=1e-5)
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            assert torch.equal(layer.base.weight, base[f"{name}.weight"])  # restored, not W + ΔW − ΔW


def test_adapters_saved_and_loaded_alone(tmp_path) -> None:
    base_state = copy.deepcopy(_model().state_dict())
    tuned = _model()
    apply_lora(tuned, rank=2)
    _randomise_adapters(tuned)
    save_lora(tuned, tmp_path, step=7)
    size = (tmp_path / "lora.safetensors").stat().st_size
    full = sum(v.numel() * 4 for v in base_state.values())
    assert size < full / 5  # the file holds the adapters alone

    fresh = _model()
    fresh.load_state_dict(base_state)
    info = load_lora(fresh, tmp_path)
    assert info["rank"] == 2 and info["step"] == 7
    codes = torch.randint(0, 2, (1, 6, 8, 8, 10)).float() * 2 - 1
    with torch.no_grad():
        assert torch.equal(fresh.decode(codes), tuned.decode(codes))


def test_only_adapters_change_in_training() -> None:
    model = _model()
    apply_lora(model, rank=2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    video = torch.rand(1, 1, 11, 64, 64)
    for _ in range(3):
        opt.zero_grad()
        model.loss(video).total.backward()
        opt.step()
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n])
