"""Reconstruction metrics and clip sources used by tokenizer training and evaluation."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from echopulse.core.metrics import codebook_stats, gaussian_blur, reconstruction_metrics, ssim
from echopulse.core.video_clips import CachedClips, NpzClips, SyntheticClips, batch, contrast_augment


def test_ssim_oracles() -> None:
    x = torch.rand(3, 1, 32, 32)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-5)
    a, b = 0.3, 0.6  # constant images: only the luminance term is left
    expected = (2 * a * b + 0.01**2) / (a * a + b * b + 0.01**2)
    assert ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b)).item() == pytest.approx(expected, rel=1e-4)
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    assert ssim(x, noisy).item() < 0.9


def test_reconstruction_metrics() -> None:
    target = torch.full((2, 1, 3, 16, 16), 0.5)
    recon = target + 0.1
    m = reconstruction_metrics(recon, target)
    assert m["mse"].tolist() == pytest.approx([0.01, 0.01], rel=1e-4)
    assert m["mae"].tolist() == pytest.approx([0.1, 0.1], rel=1e-4)
    assert m["psnr"].tolist() == pytest.approx([20.0, 20.0], rel=1e-4)
    assert reconstruction_metrics(target + 2, target)["mse"][0].item() == pytest.approx(0.25)  # recon clamped to [0, 1]


def test_codebook_stats() -> None:
    stats = codebook_stats(torch.arange(8).repeat(5), 16)
    assert stats["usage"] == 0.5 and stats["perplexity"] == pytest.approx(8.0)


def test_gaussian_blur_keeps_constants_and_mass() -> None:
    flat = torch.full((1, 1, 20, 20), 0.7)
    assert torch.allclose(gaussian_blur(flat, 2.0), flat, atol=1e-6)
    spike = torch.zeros(1, 1, 21, 21)
    spike[..., 10, 10] = 1
    assert gaussian_blur(spike, 1.0).sum().item() == pytest.approx(1.0, rel=1e-5)


def test_sources_and_batch(tmp_path) -> None:
    synthetic = SyntheticClips(11, 64)
    assert np.array_equal(synthetic.clip(3), synthetic.clip(3))
    video = batch(synthetic, [0, 1])
    assert video.shape == (2, 1, 11, 64, 64) and video.dtype == torch.float32 and video.max() <= 1
    cached = CachedClips(synthetic, 4)
    assert np.array_equal(cached.clip(5), synthetic.clip(1))
    assert np.array_equal(CachedClips(synthetic, 4, first=10).clip(15), synthetic.clip(11))
    np.savez(tmp_path / "a.npz", video=np.random.randint(0, 255, (20, 128, 128), dtype=np.uint8))
    clip = NpzClips(tmp_path, 11, 64).clip(0)
    assert clip.shape == (11, 64, 64) and clip.dtype == np.uint8


@pytest.mark.parametrize("case, words", [
    ("float", "video is float32; clips are uint8"),  # once cast to black clips, silently
    ("short", "expected (T >= 11, H, W)"),
    ("no video", "no 'video' array (it has: frames)"),
    ("truncated", "not a readable .npz"),
    ("compressed float", "video is float64"),
])
def test_a_bad_clip_file_stops_the_folder_from_opening_named(tmp_path, case: str, words: str) -> None:
    good = np.random.default_rng(0).integers(0, 255, (12, 64, 64), dtype=np.uint8)
    np.savez(tmp_path / "a_good.npz", video=good)
    bad = tmp_path / "b_bad.npz"
    if case == "float":
        np.savez(bad, video=good.astype(np.float32) / 255)
    elif case == "short":
        np.savez(bad, video=good[:5])
    elif case == "no video":
        np.savez(bad, frames=good)
    elif case == "truncated":
        np.savez(bad, video=good)
        bad.write_bytes(bad.read_bytes()[:300])
    else:
        np.savez_compressed(bad, video=good / 255.0)
    with pytest.raises(ValueError, match=re.escape(words)) as info:
        NpzClips(tmp_path, 11, 64)
    assert str(bad) in str(info.value)
    with pytest.raises(FileNotFoundError, match="no .npz files"):
        NpzClips(tmp_path / "nothing", 11, 64)


def test_cache_filled_by_worker_processes_equals_one_filled_on_demand() -> None:
    synthetic = SyntheticClips(11, 32)
    filled = CachedClips(synthetic, 6, first=100)
    filled.fill(workers=2)
    assert sorted(filled._clips) == list(range(100, 106))  # the whole pool, before any use
    on_demand = CachedClips(synthetic, 6, first=100)
    for index in range(100, 112):
        assert np.array_equal(filled.clip(index), on_demand.clip(index))
    here = CachedClips(synthetic, 3)
    here.fill(workers=1)
    assert all(np.array_equal(here.clip(i), synthetic.clip(i)) for i in range(3))


def test_batch_on_a_device_equals_the_host_batch() -> None:
    synthetic = SyntheticClips(11, 32)
    assert torch.equal(batch(synthetic, [4, 5], "cpu"), batch(synthetic, [4, 5]))


def test_simulator_source() -> None:
    pytest.importorskip("echopulse.core.simulate.paired")
    from echopulse.core.video_clips import SimulatorClips

    clip = SimulatorClips(11, 64).clip(0)
    assert clip.shape == (11, 64, 64) and clip.dtype == np.uint8


def test_contrast_augment_is_seeded_and_in_range() -> None:
    video = torch.rand(16, 1, 3, 8, 8)
    a = contrast_augment(video, torch.Generator().manual_seed(1), prob=0.5)
    b = contrast_augment(video, torch.Generator().manual_seed(1), prob=0.5)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    changed = (a != video).flatten(1).any(1)
    assert 0 < int(changed.sum()) < 16
    assert torch.equal(contrast_augment(video, torch.Generator(), prob=0.0), video)
    assert math.isfinite(float(a.sum()))


def test_fresh_noise_draws_differ_in_noise_alone() -> None:
    from echopulse.core.noise_floor import noise_draws, noise_floor
    from echopulse.core.simulate.paired import simulate_pair

    a, b = (simulate_pair(7, fresh_noise_seed=k) for k in (0, 1))
    assert not np.array_equal(a["video"], b["video"])
    assert np.array_equal(a["lv_mask"], b["lv_mask"]) and np.array_equal(a["ecg"], b["ecg"])
    assert np.array_equal(simulate_pair(7, fresh_noise_seed=1)["video"], b["video"])  # still deterministic
    clips = noise_draws(7, 11, 64, 3)
    assert clips.shape == (3, 11, 64, 64) and 0 < np.mean((clips[0] - clips[1]) ** 2) < 2e-3
    floor = noise_floor([7, 8], 11, 64, draws=4)
    assert 0 < floor["mse"] < floor["oracle"]["mse"] < 2e-3 and floor["oracle"]["ssim"] > 0.9
    with pytest.raises(ValueError, match="at least 2"):
        noise_floor([7], 11, 64, draws=1)


def test_fresh_speckle_draws_keep_the_heart_and_change_the_pattern() -> None:
    from echopulse.core.noise_floor import noise_floor
    from echopulse.core.simulate.paired import simulate_pair

    plain, a, b = simulate_pair(7), simulate_pair(7, fresh_speckle_seed=0), simulate_pair(7, fresh_speckle_seed=1)
    for key in ("lv_mask", "ecg", "lv_volume", "video_t"):
        assert np.array_equal(a[key], b[key]) and np.array_equal(a[key], plain[key])
    assert np.array_equal(simulate_pair(7, fresh_speckle_seed=1)["video"], b["video"])  # still deterministic
    video = [x["video"].astype(np.float32) / 255 for x in (plain, a, b)]
    # another pattern changes pixels everywhere in tissue, but the anatomy's local means stay
    assert np.mean((video[1] - video[2]) ** 2) > 10 * np.mean((plain["video"] - simulate_pair(7, fresh_noise_seed=0)["video"]) ** 2 / 255**2)
    local = [x.reshape(11, 8, 8, 8, 8).mean(axis=(2, 4)) for x in video]
    assert np.mean((local[1] - local[2]) ** 2) < 0.1 * np.mean((video[1] - video[2]) ** 2)
    noise, speckle = noise_floor([7, 8], 11, 64, draws=3), noise_floor([7, 8], 11, 64, draws=3, speckle=True)
    assert speckle["redrawn"] == "noise and speckle" and noise["redrawn"] == "noise"
    assert speckle["mse"] > 5 * noise["mse"] and speckle["oracle"]["ssim"] < noise["oracle"]["ssim"]


def test_best_dct_terms_is_exact_with_every_term_and_beats_a_fixed_low_pass() -> None:
    from scipy.fft import dctn, idctn

    from echopulse.core.evaluate_tokenizer import best_dct_terms

    video = torch.rand(2, 1, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(best_dct_terms(video, video[0].numel()), video, atol=1e-12)
    errors = [float(((best_dct_terms(video, k) - video) ** 2).mean()) for k in (8, 32, 96)]
    assert errors[0] > errors[1] > errors[2] > 0
    # the lowest 4x4x2 frequencies (32 terms) of each clip do worse than its 32 largest
    coeffs = dctn(video.numpy(), axes=(-3, -2, -1), norm="ortho")
    low = np.zeros_like(coeffs)
    low[..., :2, :4, :4] = coeffs[..., :2, :4, :4]
    low_error = float(((idctn(low, axes=(-3, -2, -1), norm="ortho") - video.numpy()) ** 2).mean())
    assert errors[1] <= low_error
