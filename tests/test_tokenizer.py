"""C-ViViT tokenizer: shapes, causality of encoder and decoder, prefix clips, uint8 helpers,
the conv refiner and the encoder-side digest."""
from __future__ import annotations

import logging

import pytest
import torch

from echopulse.core.config import TokenizerConfig, paper
from echopulse.core.tokenizer import CViViT, count_parameters, from_uint8, to_uint8

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def model() -> CViViT:
    torch.manual_seed(0)
    return CViViT(TokenizerConfig()).eval()


def _video(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 1, 11, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_shapes(model: CViViT) -> None:
    video = _video()
    with torch.no_grad():
        indices = model.encode(video)
        assert indices.shape == (2, 6, 8, 8) and indices.dtype == torch.long
        assert indices.min() >= 0 and indices.max() < model.config.codebook_size
        recon = model.decode_indices(indices)
        assert recon.shape == video.shape
        out = model.loss(video)
    assert out.recon.shape == video.shape and out.total.ndim == 0


def _step_of_frame(frame: int) -> int:
    return 0 if frame == 0 else (frame + 1) // 2  # step 0 = frame 0, step j = frames 2j-1, 2j


@pytest.mark.parametrize("frame", [0, 1, 2, 5, 10])
def test_encoder_is_causal(model: CViViT, frame: int) -> None:
    video = _video()
    changed = video.clone()
    changed[:, :, frame] = torch.rand_like(changed[:, :, frame])
    with torch.no_grad():
        z, z2 = model.latents(video), model.latents(changed)
        before, after = model.encode(video), model.encode(changed)
    step = _step_of_frame(frame)
    assert torch.equal(before[:, :step], after[:, :step])
    assert torch.equal(z[:, :step], z2[:, :step])  # exactly, not only after rounding to bits
    assert not torch.allclose(z[:, step], z2[:, step])  # the change does reach its own step


@pytest.fixture(scope="module")
def refined() -> CViViT:
    torch.manual_seed(0)
    model = CViViT(TokenizerConfig(refine_width=8)).eval()
    with torch.no_grad():  # a live refiner (it starts at zero output)
        torch.nn.init.normal_(model.refiner.net[-1].weight, std=0.1)
    return model


@pytest.mark.parametrize("which", ["model", "refined"])
def test_decoder_is_causal(which: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(which)
    indices = torch.randint(0, 1024, (1, 6, 8, 8))
    changed = indices.clone()
    changed[:, 3] = torch.randint(0, 1024, (1, 8, 8))
    with torch.no_grad():
        a, b = model.decode_indices(indices), model.decode_indices(changed)
    assert torch.equal(a[:, :, :5], b[:, :, :5])  # frames 0..4 come from steps 0..2
    assert not torch.allclose(a[:, :, 5:7], b[:, :, 5:7])


def test_prefix_clip_encodes_like_the_start_of_a_full_clip(model: CViViT) -> None:
    video = _video(1)
    with torch.no_grad():
        full = model.encode(video)
        first = model.encode(video[:, :, :1])
        five = model.encode(video[:, :, :5])
    assert first.shape == (1, 1, 8, 8) and torch.equal(first, full[:, :1])
    assert torch.equal(five, full[:, :3])


def test_rejects_bad_shapes(model: CViViT) -> None:
    with pytest.raises(ValueError):
        model.encode(torch.rand(1, 1, 10, 64, 64))  # 10 frames: not 1 + 2k
    with pytest.raises(ValueError):
        model.encode(torch.rand(1, 11, 64, 64))


def test_uint8_helpers() -> None:
    frames = torch.randint(0, 256, (11, 64, 64), dtype=torch.uint8)
    video = from_uint8(frames)
    assert video.shape == (1, 1, 11, 64, 64) and 0 <= video.min() and video.max() <= 1
    assert torch.equal(to_uint8(video)[0, 0], frames)
    assert from_uint8(frames[None]).shape == (1, 1, 11, 64, 64)
    assert torch.equal(to_uint8(torch.tensor([-0.5, 1.5])), torch.tensor([0, 255], dtype=torch.uint8))


def test_paper_preset_forward_on_cpu() -> None:
    config = paper().tokenizer
    model = CViViT(config).eval()
    params = count_parameters(model)
    log.info("paper tokenizer parameters: %d", params)
    print(f"paper preset tokenizer: {params:,} parameters")
    with torch.inference_mode():
        indices = model.encode(torch.rand(1, 1, 11, 128, 128))
        recon = model.decode_indices(indices)
    assert indices.shape == (1, 6, 16, 16) and config.num_tokens == 1536
    assert indices.max() < 2**13
    assert recon.shape == (1, 1, 11, 128, 128)


def test_shipped_tiny_checkpoint_reconstructs() -> None:
    from pathlib import Path

    from echopulse.core.tokenizer import load_tokenizer
    from echopulse.core.video_clips import SimulatorClips, batch

    weights = Path(__file__).resolve().parents[1] / "core" / "weights" / "tiny"
    if not (weights / "tokenizer.json").is_file():
        pytest.skip("no shipped tiny tokenizer")
    pytest.importorskip("echopulse.core.simulate.paired")
    model, preset = load_tokenizer(weights)
    assert preset.name == "tiny"
    video = batch(SimulatorClips(11, 64), [2_000_000, 2_000_001])  # seeds far from training
    with torch.no_grad():
        mse = (model.decode_indices(model.encode(video)).clamp(0, 1) - video).pow(2).mean().item()
    assert mse < 0.012  # untrained: ~0.1; the evaluated figure on 200 clips is in core/weights/README.md


def test_grafted_refiner_starts_at_the_base_output(model: CViViT) -> None:
    grown = CViViT(TokenizerConfig(refine_width=8)).eval()
    grown.inherit(model)
    video = _video(1)
    with torch.no_grad():
        assert torch.equal(grown.encode(video), model.encode(video))
        assert torch.allclose(grown.decode_indices(model.encode(video)), model.decode_indices(model.encode(video)), atol=1e-6)
    assert grown.unembed.first.weight.shape[0] == 9 * 64  # one pixel channel + 8 feature channels per pixel
    with pytest.raises(ValueError, match="cannot inherit"):
        CViViT(TokenizerConfig(dim=64)).inherit(model)


def test_token_space_digest_ignores_the_decoder(tmp_path, model: CViViT) -> None:
    from echopulse.core.config import Preset
    from echopulse.core.tokenizer import save_tokenizer, token_space_sha256

    save_tokenizer(model, Preset("plain", tokenizer=model.config), tmp_path / "a")
    changed = CViViT(TokenizerConfig(refine_width=8))
    changed.inherit(model)
    with torch.no_grad():
        changed.decoder.spatial_pos.add_(1.0)
    grown = Preset("grown", tokenizer=changed.config)
    save_tokenizer(changed, grown, tmp_path / "b", dtype=torch.float16)  # fp16 export hashes like its fp32 source
    digest = token_space_sha256(tmp_path / "a" / "tokenizer.safetensors")
    assert token_space_sha256(tmp_path / "b" / "tokenizer.safetensors") == digest
    with torch.no_grad():
        changed.to_bits.bias.add_(0.01)
    save_tokenizer(changed, grown, tmp_path / "c")
    assert token_space_sha256(tmp_path / "c" / "tokenizer.safetensors") != digest
