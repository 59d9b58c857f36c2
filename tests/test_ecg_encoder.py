"""ECG encoder: per-patch output (never pooled), times relative to R, any lead count, MAE."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from echopulse.core.beat_window import beat_window
from echopulse.core.config import EcgEncoderConfig
from echopulse.core.ecg_encoder import EcgEncoder

from _generator_fixtures import ecg_batch, small_preset


@pytest.fixture(scope="module")
def encoder() -> EcgEncoder:
    torch.manual_seed(0)
    return EcgEncoder(small_preset().ecg).eval()


def test_one_embedding_per_patch_with_time_relative_to_r(encoder: EcgEncoder) -> None:
    cfg = encoder.cfg
    window, valid, leads = ecg_batch(small_preset(), b=2, leads=1)
    emb, times, patch_valid = encoder.encode(window, valid, leads)
    n = cfg.patches_per_lead
    assert emb.shape == (2, n, cfg.dim) and times.shape == (2, n) and patch_valid.all()
    # patch centres: the first starts at -pre_r_s, consecutive centres one patch apart
    assert times[0, 0].item() == pytest.approx(-cfg.pre_r_s + 0.5 * cfg.patch / cfg.fs)
    assert torch.allclose(times[0].diff(), torch.full((n - 1,), cfg.patch / cfg.fs))
    # pre_r_s is a whole number of patches, so one patch starts exactly at the R peak
    starts = times[0] - 0.5 * cfg.patch / cfg.fs
    assert starts.abs().min().item() < 1e-5


@pytest.mark.parametrize("leads", [1, 3, 12])
def test_any_number_of_leads(encoder: EcgEncoder, leads: int) -> None:
    window, valid, lead_ids = ecg_batch(small_preset(), b=1, leads=leads)
    emb, times, _ = encoder.encode(window, valid, lead_ids)
    assert emb.shape == (1, leads * encoder.cfg.patches_per_lead, encoder.cfg.dim)
    assert torch.isfinite(emb).all()


def test_lead_identity_matters(encoder: EcgEncoder) -> None:
    window, valid, _ = ecg_batch(small_preset(), b=1, leads=1)
    a = encoder.encode(window, valid, torch.tensor([0]))[0]
    b = encoder.encode(window, valid, torch.tensor([5]))[0]
    assert not torch.allclose(a, b)


def test_invalid_samples_hide_their_patches_and_do_not_leak(encoder: EcgEncoder) -> None:
    cfg = encoder.cfg
    window, valid, leads = ecg_batch(small_preset(), b=1, leads=1)
    valid[..., cfg.window_samples // 2 + 3 :] = False  # the stream has not delivered the end yet
    emb, _, patch_valid = encoder.encode(window, valid, leads)
    expected = (cfg.window_samples // 2 + 3) // cfg.patch
    assert int(patch_valid.sum()) == expected
    # whatever sits in the undelivered samples changes nothing
    noisy = window.clone()
    noisy[~valid] = 1e3
    emb2 = encoder.encode(noisy, valid, leads)[0]
    assert torch.allclose(emb[:, :expected], emb2[:, :expected], atol=1e-5)


def test_units_do_not_matter(encoder: EcgEncoder) -> None:
    window, valid, leads = ecg_batch(small_preset(), b=1)
    mv = encoder.encode(window, valid, leads)[0]
    uv = encoder.encode(1000.0 * window + 50.0, valid, leads)[0]
    assert torch.allclose(mv, uv, atol=1e-3)


def test_nothing_valid_gives_finite_output(encoder: EcgEncoder) -> None:
    window, valid, leads = ecg_batch(small_preset(), b=1)
    emb = encoder.encode(window, torch.zeros_like(valid), leads)[0]
    assert torch.isfinite(emb).all()


def test_mae_pretraining_learns() -> None:
    torch.manual_seed(0)
    cfg = small_preset().ecg
    model = EcgEncoder(cfg)
    t = torch.arange(cfg.window_samples) / cfg.fs
    window = torch.sin(2 * torch.pi * 1.3 * t)[None, None].repeat(4, 1, 1)  # an easy, smooth signal
    valid = torch.ones_like(window, dtype=torch.bool)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    first = model.mae_loss(window, valid, torch.tensor([0]), gen).item()
    for _ in range(40):
        loss = model.mae_loss(window, valid, torch.tensor([0]), gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


# beat windows


def test_window_is_resampled_from_any_rate() -> None:
    cfg = EcgEncoderConfig()
    f = 7.0  # Hz: smooth enough for linear interpolation at 250 Hz
    for fs in (130.0, 360.0, 512.0):
        t = np.arange(int(10 * fs)) / fs
        ecg = np.sin(2 * np.pi * f * t)[None]
        window, valid = beat_window(ecg, fs, r_time=4.0, cfg=cfg)
        truth = np.sin(2 * np.pi * f * (4.0 - cfg.pre_r_s + np.arange(cfg.window_samples) / cfg.fs))
        assert valid.all() and window.shape == (1, cfg.window_samples)
        assert np.abs(window[0] - truth).max() < (0.06 if fs < 200 else 0.02)


def test_window_marks_what_the_stream_has_not_delivered() -> None:
    cfg = EcgEncoderConfig()
    fs = 250.0
    ecg = np.random.default_rng(0).normal(size=(2, 2500))
    ecg[1, 1010] = np.nan
    window, valid = beat_window(ecg, fs, r_time=4.2, cfg=cfg, available_until=5.0)
    times = 4.2 - cfg.pre_r_s + np.arange(cfg.window_samples) / cfg.fs
    assert not valid[times > 5.0].any()
    nan_time = 1010 / fs
    assert not valid[np.abs(times - nan_time) < 1 / fs].any()
    assert np.isfinite(window).all() and (window[:, ~valid] == 0).all()
    # before the recording starts: invalid as well
    _, early = beat_window(ecg, fs, r_time=0.2, cfg=cfg)
    assert not early[: int(0.3 * cfg.fs) - 1].any() and early[int(0.3 * cfg.fs) + 1 :].all()


# command line


def test_train_ecg_command_writes_a_checkpoint(tmp_path) -> None:
    from echopulse.core.ecg_encoder import load_ecg_encoder
    from echopulse.stream.cli import main

    out = tmp_path / "ecg"
    assert main(["train", "ecg", "--steps", "2", "--batch", "2", "--leads", "1", "--out", str(out), "--checkpoint-every", "2"]) == 0
    model, preset = load_ecg_encoder(out)
    assert preset.name == "tiny" and isinstance(model, EcgEncoder)
    # a second run into the same directory must say --resume
    assert main(["train", "ecg", "--steps", "2", "--out", str(out)]) == 2


def test_train_transformer_command_checks_its_inputs(tmp_path, capsys) -> None:
    from echopulse.stream.cli import main

    assert main(["train", "transformer", "--tokenizer", str(tmp_path), "--out", str(tmp_path / "gen")]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
