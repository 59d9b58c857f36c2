"""Training loops of the generator's parts: ECG encoder (MAE), masked transformer, token critic.

Same conventions as the tokenizer's (`core/train_tokenizer.py`): AdamW with warmup +
cosine, EMA weights saved as the model, resumable state, `log.jsonl`, data addressed by
the step so a resumed run sees what the interrupted one would have.

Output directory of each run:
    ecg.* | transformer.* | critic.*   EMA weights + JSON with the preset and the recipe
    train_state.safetensors + .json     raw weights, optimizer, EMA (resume; critic_train_state.*)
    log.jsonl                            losses every `log_every` steps (critic_log.jsonl)
The transformer run also copies tokenizer.* and ecg.* next to its weights, so its
directory is a complete generator checkpoint (`Generator.load(DIR)`).
"""
from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .checkpoint import load_json, load_module, load_tensors, model_paths, save_json, save_tensors
from .config import Preset
from .critic import TokenCritic, critic_loss
from .data_pairs import PairCache, PairSample, simulated_pair
from .ecg_encoder import EcgEncoder, load_ecg_encoder, save_ecg_encoder
from .ecg_windows import ecg_batch
from .tokenizer import load_tokenizer, token_space_sha256
from .training import (Ema, TrainingState, adamw, clip_gradients, losses_postfix, open_run, progress, select_device,
                       warmup_cosine)
from .transformer import EcgFeatures, build_transformer, load_transformer, save_transformer

log = logging.getLogger(__name__)


@dataclass
class Recipe:
    steps: int = 3000
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    checkpoint_every: int = 250
    log_every: int = 10
    seed: int = 0               # first subject / window index used for training
    train_subjects: int = 2000  # paired clips cached for transformer / critic training
    ecg_lr_scale: float = 0.1   # the pretrained ECG encoder is fine-tuned at this fraction of lr (0: frozen)
    workers: int = 1            # processes simulating the pairs (once per run; they are cached)


def _copy_part(src: Path, dst: Path, name: str) -> None:
    for suffix in (".safetensors", ".json"):
        if (src / f"{name}{suffix}").resolve() != (dst / f"{name}{suffix}").resolve():
            shutil.copyfile(src / f"{name}{suffix}", dst / f"{name}{suffix}")


def _loop(
    name: str,
    out: Path,
    recipe: Recipe,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    ema: Ema,
    loss_at: Callable[[int], dict[str, torch.Tensor]],
    save: Callable[[nn.Module, int], None],
    resume: bool,
    config: dict[str, Any],
    prefix: str = "",
    more_emas: dict[str, tuple[Ema, nn.Module]] | None = None,
) -> dict[str, float]:
    """The shared loop: lr schedule, step, clip, EMA, log, checkpoint; `loss_at(step)` gives the losses.

    `more_emas` name averages of other trained modules (the fine-tuned ECG encoder): updated
    after each step like `ema`, and saved and restored with it, so a resumed run ends where
    an uninterrupted one does.

    `prefix` names the state and log files (a critic trained inside a generator directory
    keeps its own `critic_train_state.*` and `critic_log.jsonl`)."""
    model = modules["model"]
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # before a resume overwrites them
    state = TrainingState(out, f"{prefix}train_state")
    step = 0
    emas = {"ema": ema, **{name: average for name, (average, _) in (more_emas or {}).items()}}
    if resume and state.exists():
        step, _ = state.load(modules, {"opt": optimizer}, emas, until=recipe.steps)
    elif resume:
        log.warning("no training state in %s: starting a new run", out)
    elif state.exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume or choose another --out")
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def checkpoint(at: int) -> None:
        # the model files first: a run stopped between the two resumes from the state before
        # and writes them again, where the other order left a finished state without them
        averaged = copy.deepcopy(model)
        ema.copy_to(averaged)
        save(averaged, at)
        state.save(at, modules, {"opt": optimizer}, emas, extra={"config": config})

    logged: dict[str, float] = {}
    t0 = time.perf_counter()
    bar = progress(range(step, recipe.steps), total=recipe.steps, initial=step, desc=name)
    with open(out / f"{prefix}log.jsonl", "a") as log_file:
        for step in bar:
            for module in modules.values():
                module.train()
            scale = warmup_cosine(step, 1.0, recipe.warmup, recipe.steps, recipe.min_lr_ratio)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * scale
            losses = loss_at(step)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            grad = clip_gradients(params, recipe.grad_clip)
            optimizer.step()
            ema.update(model)
            for average, module in (more_emas or {}).values():
                average.update(module)
            if (step + 1) % recipe.log_every == 0 or step + 1 == recipe.steps:
                logged = {k: float(v.detach()) for k, v in losses.items()} | {"grad": grad}
                bar.set_postfix(losses_postfix(logged))
                log_file.write(json.dumps({"step": step + 1, "time_s": round(time.perf_counter() - t0, 2), **logged}) + "\n")
                log_file.flush()
            if (step + 1) % recipe.checkpoint_every == 0 or step + 1 == recipe.steps:
                checkpoint(step + 1)
    return logged


def train_ecg(preset: Preset, recipe: Recipe, out: Path, resume: bool = False, device: str = "auto", leads: int = 0) -> dict[str, float]:
    """MAE pretraining on simulated ECG beat windows. `leads` 0: 1..max_leads drawn per step."""
    dev = select_device(device)
    open_run(out, asdict(recipe), resume)  # before anything is written into a run it would refuse
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    model = EcgEncoder(preset.ecg).to(dev)
    opt = adamw(model, lr=recipe.lr, weight_decay=recipe.weight_decay)
    ema = Ema(model, decay=recipe.ema_decay)
    config = {"recipe": asdict(recipe), "leads": leads}
    gen = torch.Generator(device=dev)

    def loss_at(step: int) -> dict[str, torch.Tensor]:
        first = recipe.seed + step * recipe.batch
        # one lead count per step keeps shapes static; watches (1 lead) come up often
        n_leads = leads or (1, 1, 2, 3, 12)[step % 5]
        window, valid, lead_ids = ecg_batch(list(range(first, first + recipe.batch)), preset.ecg, n_leads)
        gen.manual_seed(recipe.seed * 1_000_003 + step)
        return {"loss": model.mae_loss(window.to(dev), valid.to(dev), lead_ids.to(dev), gen)}

    def save(averaged: nn.Module, at: int) -> None:
        save_ecg_encoder(averaged, preset, out, step=at, train=config)

    log.info("pretraining the ECG encoder (%d parameters) on %s", sum(p.numel() for p in model.parameters()), dev)
    return _loop("ecg", out, recipe, {"model": model}, opt, ema, loss_at, save, resume, config)


def train_transformer(
    preset: Preset,
    recipe: Recipe,
    out: Path,
    tokenizer_dir: Path,
    ecg_dir: Path | None = None,
    resume: bool = False,
    device: str = "auto",
    pairs: Callable[[int, Preset], PairSample] = simulated_pair,
    raw_pairs: Path | None = None,
    init: Path | None = None,
) -> dict[str, float]:
    """Masked-token training on cached pairs (`pairs(seed, preset)`, the simulator by default;
    `raw_pairs` an .npz of simulated pairs shared between runs); the ECG encoder is fine-tuned slowly.
    `init`: a generator directory whose transformer (and ECG encoder) weights start the run,
    e.g. one trained with an earlier tokenizer: everything but the token table carries over."""
    dev = select_device(device)
    open_run(out, asdict(recipe), resume)  # before anything is written into a run it would refuse
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, tok_preset = load_tokenizer(tokenizer_dir, device=dev)
    preset = Preset(name=preset.name, tokenizer=tok_preset.tokenizer, ecg=preset.ecg, transformer=preset.transformer)
    torch.manual_seed(recipe.seed)
    if ecg_dir is not None:
        ecg, ecg_preset = load_ecg_encoder(ecg_dir, device=dev)
        preset.ecg = ecg_preset.ecg
    else:
        ecg = EcgEncoder(preset.ecg).to(dev)
    model = build_transformer(preset).to(dev)
    if init is not None and not resume:
        load_module(model, init / "transformer.safetensors")
        if (init / "ecg.safetensors").is_file():
            load_module(ecg, init / "ecg.safetensors")
        log.info("starting from the weights in %s", init)
    if resume and (out / "tokenizer.safetensors").is_file():  # the run's tokens are those of the tokenizer it began with
        if token_space_sha256(out / "tokenizer.safetensors") != token_space_sha256(tokenizer_dir / "tokenizer.safetensors"):
            raise ValueError(f"--tokenizer {tokenizer_dir} makes other tokens than the one {out} was trained on: "
                             "start a new run (with --init to keep the weights)")
    _copy_part(tokenizer_dir, out, "tokenizer")
    tokens_sha = token_space_sha256(out / "tokenizer.safetensors")
    seeds = range(recipe.seed, recipe.seed + recipe.train_subjects)
    data = PairCache.build(out / "pairs.npz", preset, tokenizer, seeds, dev, pairs, raw_path=raw_pairs, workers=recipe.workers,
                           token_space=tokens_sha)
    del tokenizer
    opt = adamw(model, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.ecg_lr_scale > 0:
        ecg_opt_params = [p for p in ecg.parameters() if p.requires_grad]
        opt.add_param_group({"params": ecg_opt_params, "lr": recipe.lr * recipe.ecg_lr_scale, "weight_decay": recipe.weight_decay})
    else:
        ecg.requires_grad_(False)
    ema = Ema(model, decay=recipe.ema_decay)
    ecg_ema = Ema(ecg, decay=recipe.ema_decay)
    config = {"recipe": asdict(recipe), "tokenizer": str(tokenizer_dir), "ecg": str(ecg_dir) if ecg_dir else None, "init": str(init) if init else None}
    gen = torch.Generator(device=dev)

    def loss_at(step: int) -> dict[str, torch.Tensor]:
        # two steps in three see lead 0 alone (a watch), the third every cached lead
        b = data.batch(data.indices(step, recipe.batch, recipe.seed), dev, leads=1 if step % 3 else None)
        gen.manual_seed(recipe.seed * 1_000_003 + step)
        feats = EcgFeatures(*ecg.encode(b.window, b.valid, b.lead_ids))
        loss = model.loss(b.tokens, feats, b.rr, b.ref_tokens, b.ref_valid, gen)
        return {"loss": loss}

    def save(averaged: nn.Module, at: int) -> None:
        save_transformer(averaged, preset, out, step=at, train=config, tokenizer_tokens_sha256=tokens_sha)
        ecg_avg = copy.deepcopy(ecg)
        ecg_ema.copy_to(ecg_avg)
        save_ecg_encoder(ecg_avg, preset, out, step=at, finetuned_from=config["ecg"])

    log.info("training the masked transformer (%d parameters) on %d cached pairs, %s", sum(p.numel() for p in model.parameters()), len(data), dev)
    modules: dict[str, nn.Module] = {"model": model, "ecg": ecg}
    return _loop("transformer", out, recipe, modules, opt, ema, loss_at, save, resume, config,
                 more_emas={"ecg_ema": (ecg_ema, ecg)})


def train_critic(
    recipe: Recipe,
    out: Path,
    generator_dir: Path,
    resume: bool = False,
    device: str = "auto",
    pairs: Callable[[int, Preset], PairSample] = simulated_pair,
) -> dict[str, float]:
    """Token-critic training on the (frozen) transformer's samples; saves critic.* into `out`."""
    dev = select_device(device)
    open_run(out, asdict(recipe), resume, name="critic_train_state")  # before anything is written into a run it would refuse
    out.mkdir(parents=True, exist_ok=True)
    transformer, gen_preset = load_transformer(generator_dir, device=dev)
    ecg, _ = load_ecg_encoder(generator_dir, device=dev)
    transformer.requires_grad_(False)
    ecg.requires_grad_(False)
    tokenizer, _ = load_tokenizer(generator_dir, device=dev)
    seeds = range(recipe.seed, recipe.seed + recipe.train_subjects)
    token_space = token_space_sha256(generator_dir / "tokenizer.safetensors")
    # the generator's own pairs when they are these subjects; else made in --out, never
    # over the caches a later `train transformer --resume` of that generator would reuse
    data = PairCache.cached(generator_dir / "pairs.npz", seeds, token_space) or PairCache.build(
        out / "pairs.npz", gen_preset, tokenizer, seeds, dev, pairs, workers=recipe.workers, token_space=token_space)
    del tokenizer
    torch.manual_seed(recipe.seed)
    critic = TokenCritic(gen_preset.transformer, gen_preset.tokenizer, gen_preset.ecg.dim).to(dev)
    opt = adamw(critic, lr=recipe.lr, weight_decay=recipe.weight_decay)
    ema = Ema(critic, decay=recipe.ema_decay)
    config = {"recipe": asdict(recipe), "generator": str(generator_dir)}
    gen = torch.Generator(device=dev)

    def loss_at(step: int) -> dict[str, torch.Tensor]:
        b = data.batch(data.indices(step, recipe.batch, recipe.seed), dev, leads=1 if step % 3 else None)
        gen.manual_seed(recipe.seed * 1_000_003 + step)
        with torch.no_grad():
            feats = EcgFeatures(*ecg.encode(b.window, b.valid, b.lead_ids))
        return {"loss": critic_loss(critic, transformer, b.tokens, feats, b.rr, b.ref_tokens, b.ref_valid, gen)}

    def save(averaged: nn.Module, at: int) -> None:
        save_transformer(averaged, gen_preset, out, name="critic", step=at, train=config)

    log.info("training the token critic on %s", dev)
    return _loop("critic", out, recipe, {"model": critic}, opt, ema, loss_at, save, resume, config, prefix="critic_")


def export_generator(
    src: Path,
    dst: Path,
    dtype: torch.dtype | None = torch.float16,
    parts: tuple[str, ...] = ("tokenizer", "ecg", "transformer", "critic"),
) -> list[str]:
    """Copy a generator checkpoint's parts (those of `parts` present in `src`) into `dst`,
    weights cast to `dtype` (fp16 halves the shipped size; loading casts back)."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in parts:
        weights, config_path = model_paths(src, name)
        if not weights.is_file():
            continue
        tensors = load_tensors(weights)
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        out_weights, out_config = model_paths(dst, name)
        save_tensors(tensors, out_weights)
        save_json({**load_json(config_path), "exported_from": src.name}, out_config)
        copied.append(name)
    # the tokens a transformer learned are those of one tokenizer encoder: record which
    tokenizer = dst / "tokenizer.safetensors" if "tokenizer" in copied else src / "tokenizer.safetensors"
    for name in ("transformer", "critic"):
        if name in copied:
            config_path = model_paths(dst, name)[1]
            meta = {k: v for k, v in load_json(config_path).items() if k != "tokenizer_sha256"}
            save_json({**meta, "tokenizer_tokens_sha256": token_space_sha256(tokenizer)}, config_path)
    return copied
