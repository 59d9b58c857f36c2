"""Tokenizer training: checkpoints, shared training utilities, loss decrease, exact resume, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from echopulse.core.checkpoint import load_tensors, save_tensors
from echopulse.core.config import Preset, TokenizerConfig, tiny
from echopulse.core.losses import Discriminator3d, GradientSsimLoss, adaptive_gan_weight, hinge_d_loss
from echopulse.core.tokenizer import CViViT, load_tokenizer, save_tokenizer, token_space_sha256
from echopulse.core.train_tokenizer import RunPaths, TokenizerRecipe, train_tokenizer
from echopulse.core.training import Ema, TrainingState, adamw, warmup_cosine
from echopulse.stream.cli import main

from _generator_fixtures import one_thread  # noqa: F401 (a fixture)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path) -> None:
    torch.manual_seed(0)
    preset = tiny()
    model = CViViT(preset.tokenizer).eval()
    save_tokenizer(model, preset, tmp_path, step=3)
    loaded, loaded_preset = load_tokenizer(tmp_path)
    assert loaded_preset == preset
    assert json.loads((tmp_path / "tokenizer.json").read_text())["step"] == 3
    video = torch.rand(2, 1, 11, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.encode(video), loaded.encode(video))
        indices = model.encode(video)
        assert torch.equal(model.decode_indices(indices), loaded.decode_indices(indices))


def test_fp16_checkpoint_is_half_the_size_and_close(tmp_path) -> None:
    preset = tiny()
    model = CViViT(preset.tokenizer).eval()
    save_tokenizer(model, preset, tmp_path / "a")
    save_tokenizer(model, preset, tmp_path / "b", dtype=torch.float16)
    full, half = ((tmp_path / d / "tokenizer.safetensors").stat().st_size for d in "ab")
    assert half < 0.55 * full
    loaded, _ = load_tokenizer(tmp_path / "b")
    indices = torch.randint(0, 1024, (1, 6, 8, 8))
    with torch.no_grad():
        assert torch.allclose(model.decode_indices(indices), loaded.decode_indices(indices), atol=2e-2)


def test_training_state_round_trip(tmp_path) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = adamw(net, lr=1e-2)
    ema = Ema(net, decay=0.9)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        ema.update(net)
    TrainingState(tmp_path).save(3, {"net": net}, {"opt": opt}, {"ema": ema}, extra={"note": "x"})
    net2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt2, ema2 = adamw(net2, lr=1e-2), Ema(net2)
    step, extra = TrainingState(tmp_path).load({"net": net2}, {"opt": opt2}, {"ema": ema2})
    assert step == 3 and extra == {"note": "x"} and ema2.updates == 3
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    for key in ("exp_avg", "exp_avg_sq"):
        for p, p2 in zip(net.parameters(), net2.parameters()):
            assert torch.equal(opt.state[p][key], opt2.state[p2][key])
    assert all(torch.equal(ema.shadow[k], ema2.shadow[k]) for k in ema.shadow)


def test_a_save_cut_between_its_two_files_still_resumes_consistently(tmp_path) -> None:
    net = torch.nn.Linear(4, 2)
    opt, ema = adamw(net, lr=1e-2), Ema(net, decay=0.9)
    state = TrainingState(tmp_path)
    state.save(2, {"net": net}, {"opt": opt}, {"ema": ema})
    stale = state.json_path.read_text()
    for _ in range(2):
        ema.update(net)
    state.save(4, {"net": net}, {"opt": opt}, {"ema": ema})
    state.json_path.write_text(stale)  # the crash came after the tensors' rename, before the JSON's
    ema2 = Ema(torch.nn.Linear(4, 2))
    step, _ = state.load({"net": torch.nn.Linear(4, 2)}, {"opt": adamw(torch.nn.Linear(4, 2), lr=1e-2)}, {"ema": ema2})
    assert step == 4 and ema2.updates == ema.updates  # once: step 2 read beside step 4's weights


def test_safetensors_only(tmp_path) -> None:
    save_tensors({"a": torch.arange(3)}, tmp_path / "x.safetensors")
    assert torch.equal(load_tensors(tmp_path / "x.safetensors")["a"], torch.arange(3))
    with pytest.raises(FileNotFoundError):
        load_tensors(tmp_path / "missing.safetensors")


def test_warmup_cosine_schedule() -> None:
    lrs = [warmup_cosine(s, 1.0, 10, 100, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert warmup_cosine(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)


def test_gan_pieces() -> None:
    disc = Discriminator3d()
    video = torch.rand(2, 1, 11, 64, 64)
    logits = disc(video)
    assert logits.shape == (2, 1, 6, 8, 8)
    assert hinge_d_loss(torch.full((3,), 2.0), torch.full((3,), -2.0)).item() == 0.0
    w = torch.nn.Parameter(torch.randn(3, 3))
    x = torch.randn(4, 3)
    rec, gan = (x @ w).pow(2).mean(), (x @ w).mean()
    lam = adaptive_gan_weight(rec, gan, [w])
    g_rec = torch.autograd.grad(rec, w, retain_graph=True)[0].norm()
    g_gan = torch.autograd.grad(gan, w)[0].norm()
    assert lam.item() == pytest.approx((g_rec / (g_gan + 1e-4)).item(), rel=1e-5)
    assert GradientSsimLoss()(video, video).item() == pytest.approx(0.0, abs=1e-5)


def _recipe(**kw) -> TokenizerRecipe:
    base = dict(steps=24, batch=2, lr=2e-3, warmup=4, log_every=4, checkpoint_every=12, gan_start=16, augment_prob=0.5)
    return TokenizerRecipe(**{**base, **kw})


def _log(path) -> list[dict]:
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


def test_training_loss_decreases(tmp_path, one_thread) -> None:
    train_tokenizer(tiny(), _recipe(), RunPaths(out=tmp_path, data="synthetic"))
    log = _log(tmp_path)
    assert log[-1]["step"] == 24
    assert log[-1]["mse"] < 0.5 * log[0]["mse"]
    assert log[-1]["g"] != 0.0 and log[-1]["lam"] > 0  # the GAN switched on at step 16
    assert (tmp_path / "tokenizer.safetensors").is_file() and (tmp_path / "train_state.safetensors").is_file()


def test_resume_continues_exactly(tmp_path, one_thread) -> None:
    recipe = _recipe(steps=8, checkpoint_every=4, gan_start=2, log_every=2)
    train_tokenizer(tiny(), recipe, RunPaths(out=tmp_path / "whole", data="synthetic"))
    train_tokenizer(tiny(), _recipe(steps=4, checkpoint_every=4, gan_start=2, log_every=2), RunPaths(out=tmp_path / "split", data="synthetic"))
    train_tokenizer(tiny(), recipe, RunPaths(out=tmp_path / "split", data="synthetic"), resume=True)
    whole, split = load_tokenizer(tmp_path / "whole")[0], load_tokenizer(tmp_path / "split")[0]
    for (name, a), b in zip(whole.state_dict().items(), split.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    with pytest.raises(FileExistsError):
        train_tokenizer(tiny(), recipe, RunPaths(out=tmp_path / "whole", data="synthetic"))


def test_resuming_a_finished_run_says_so(tmp_path, one_thread, caplog) -> None:
    recipe = _recipe(steps=2, checkpoint_every=2, log_every=1)
    train_tokenizer(tiny(), recipe, RunPaths(out=tmp_path / "run", data="synthetic"))
    with caplog.at_level("WARNING"):
        train_tokenizer(tiny(), _recipe(steps=1, checkpoint_every=2, log_every=1), RunPaths(out=tmp_path / "run", data="synthetic"),
                        resume=True)
    assert "already at step 2 of 1: nothing to train" in caplog.text  # once: exit 0 and not a word


def test_cli_train_lora_and_evaluate(tmp_path, capsys) -> None:
    base, tuned, report = tmp_path / "base", tmp_path / "lora", tmp_path / "eval.json"
    common = ["--data", "synthetic", "--batch", "1", "--threads", "1", "--checkpoint-every", "2"]
    assert main(["train", "tokenizer", "--steps", "2", "--out", str(base), *common]) == 0
    assert main(["train", "tokenizer", "--steps", "2", "--out", str(tuned), "--lora", "2", "--init", str(base), *common]) == 0
    assert (tuned / "lora.safetensors").is_file() and not (tuned / "tokenizer.safetensors").exists()
    assert main(["evaluate", "tokenizer", "--checkpoint", str(base), "--lora", str(tuned), "--n", "3",
                 "--data", "synthetic", "--out", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["lora"] == str(tuned)  # the adapters scored are named beside the checkpoint
    for key in ("mse", "mae", "ssim", "psnr", "codebook_usage", "codebook_perplexity", "encode_ms_per_clip", "decode_ms_per_clip"):
        assert key in result
    assert "sigma_1" in result["lowpass_reference"]
    bits = TokenizerConfig().num_tokens * TokenizerConfig().lfq_bits
    assert result["lowpass_reference"][f"dct_best_{bits // 8}"]["mse"] > 0  # the transform code at the tokens' rate
    assert main(["evaluate", "tokenizer", "--checkpoint", str(base), "--n", "2", "--noise-floor", "3", "--speckle-floor", "2",
                 "--out", str(report)]) == 0
    simulated = json.loads(report.read_text())
    floor, speckle = simulated["noise_floor"], simulated["speckle_floor"]
    assert floor["draws"] == 3 and floor["clips"] == 2 and 0 < floor["mse"] < simulated["mse"]
    assert speckle["draws"] == 2 and speckle["redrawn"] == "noise and speckle" and speckle["mse"] > 5 * floor["mse"]
    for flag in ("--noise-floor", "--speckle-floor"):
        assert main(["evaluate", "tokenizer", "--checkpoint", str(base), flag, "3", "--data", "synthetic"]) == 2
        assert main(["evaluate", "tokenizer", "--checkpoint", str(base), flag, "1"]) == 2
        assert flag in capsys.readouterr().err
    assert main(["train", "tokenizer", "--steps", "2", "--out", str(tuned), "--lora", "2"]) == 2
    assert "--init" in capsys.readouterr().err


def test_decoder_only_training_keeps_every_token(tmp_path, one_thread, capsys) -> None:
    base, tuned = tmp_path / "base", tmp_path / "dec"
    common = ["--data", "synthetic", "--batch", "2", "--threads", "1", "--checkpoint-every", "3", "--perceptual-weight", "0.2"]
    plain = TokenizerConfig()  # the paper's linear head, no refiner
    save_tokenizer(CViViT(plain), Preset("plain", tokenizer=plain), base)
    assert main(["train", "tokenizer", "--steps", "3", "--lr", "1e-2", "--out", str(tuned), "--init", str(base),
                 "--decoder-only", "--refine-width", "8", *common]) == 0
    a, b = load_tokenizer(base)[0], load_tokenizer(tuned)[0]
    assert b.refiner is not None and b.config.refine_width == 8
    assert token_space_sha256(base / "tokenizer.safetensors") == token_space_sha256(tuned / "tokenizer.safetensors")
    video = torch.rand(2, 1, 11, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(a.encode(video), b.encode(video))
        assert not torch.allclose(a.decode_indices(a.encode(video)), b.decode_indices(b.encode(video)))
    assert not torch.equal(b.refiner.net[-1].weight, torch.zeros_like(b.refiner.net[-1].weight))  # the refiner trained
    assert main(["train", "tokenizer", "--steps", "1", "--out", str(tmp_path / "x"), "--decoder-only"]) == 2
    assert "--decoder-only needs --init" in capsys.readouterr().err
    assert main(["train", "tokenizer", "--steps", "1", "--out", str(tmp_path / "y"), "--init", str(tuned),
                 "--decoder-only", "--refine-width", "16", *common]) == 2  # a refiner of another width
    assert "cannot inherit 'refiner" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # a refused run writes nothing


def test_lfq_bits_sets_the_codebook_of_a_run_from_scratch(tmp_path, one_thread, capsys) -> None:
    out = tmp_path / "bits"
    common = ["--data", "synthetic", "--batch", "2", "--threads", "1", "--perceptual-weight", "0.2", "--gan-weight", "0"]
    assert main(["train", "tokenizer", "--steps", "1", "--lfq-bits", "6", "--out", str(out), *common]) == 0
    model, saved = load_tokenizer(out)
    assert saved.tokenizer.lfq_bits == 6 and model.config.codebook_size == 64
    assert main(["train", "tokenizer", "--steps", "1", "--lfq-bits", "8", "--init", str(out),
                 "--out", str(tmp_path / "again"), *common]) == 2
    assert "--lfq-bits changes the codebook" in capsys.readouterr().err


def test_workers_fill_the_pool_and_train_exactly_as_without(tmp_path, one_thread, capsys) -> None:
    common = ["--data", "synthetic", "--batch", "2", "--threads", "1", "--perceptual-weight", "0.2", "--gan-weight", "0",
              "--steps", "2", "--cache", "4"]
    assert main(["train", "tokenizer", *common, "--out", str(tmp_path / "serial")]) == 0
    assert main(["train", "tokenizer", *common, "--workers", "2", "--out", str(tmp_path / "parallel")]) == 0
    a, b = load_tokenizer(tmp_path / "serial")[0], load_tokenizer(tmp_path / "parallel")[0]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert main(["train", "tokenizer", *common[:-2], "--workers", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--workers fills the clip pool" in capsys.readouterr().err


def test_vgg_perceptual_loss_loads_a_local_file(tmp_path) -> None:
    from safetensors.torch import save_file

    from echopulse.core.losses import Vgg16Features, perceptual_loss

    trunk = Vgg16Features()
    # torchvision's layout without the "features." prefix is accepted too
    save_file({k.removeprefix("features."): v for k, v in trunk.state_dict().items()}, str(tmp_path / "vgg.safetensors"))
    loss = perceptual_loss(tmp_path / "vgg.safetensors")
    assert loss.name == "vgg16"
    assert not any(p.requires_grad for p in loss.parameters())
    video = torch.rand(1, 1, 1, 32, 32)
    assert loss(video, video).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(video, video.flip(-1)).item() > 0
    assert perceptual_loss(None).name == "multiscale-gradient+ssim"


def test_cli_data_folder_problems_are_one_line(tmp_path, capsys) -> None:
    from echopulse.core.generator import DEFAULT_WEIGHTS

    folder = tmp_path / "clips"
    folder.mkdir()
    np.savez(folder / "a.npz", video=np.zeros((11, 64, 64), np.float32))
    for command in (["train", "tokenizer", "--steps", "1", "--batch", "1", "--out", str(tmp_path / "run")],
                    ["evaluate", "tokenizer", "--checkpoint", str(DEFAULT_WEIGHTS), "--n", "1"]):
        assert main([*command, "--data", str(folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "a.npz: video is float32" in err
