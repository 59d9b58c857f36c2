"""Train the C-ViViT tokenizer (or a LoRA adapter on a trained one).

Loss = w_mse·MSE + w_perc·perceptual + LFQ (commitment + entropy) + w_gan·λ·hinge-GAN,
λ adaptive (paper eq. 6) and the GAN switched on after `gan_start` steps. Data come from
a `video_clips` source by index: the clips of step s are indices
seed + s·batch … seed + (s+1)·batch − 1, so a resumed run sees exactly the data the
interrupted one would have. Evaluation seeds should lie outside that range.

A decoder-only run freezes the encoder side of `init` (its tokens, and so any
transformer trained on them, stay valid) and trains what follows the quantizer,
optionally with a conv refiner grafted on.

Output directory:
    tokenizer.safetensors + tokenizer.json   EMA weights and the preset (full model runs)
    lora.safetensors + lora.json             EMA adapters alone (LoRA runs)
    train_state.safetensors + .json          raw weights, optimizers, EMA, discriminator (resume)
    log.jsonl                                 losses every `log_every` steps
"""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import Preset
from .lora import DEFAULT_TARGETS, apply_lora, lora_parameters, save_lora
from .losses import Discriminator3d, adaptive_gan_weight, hinge_d_loss, hinge_g_loss, perceptual_loss
from .tokenizer import CViViT, load_tokenizer, save_tokenizer
from .training import (Ema, TrainingState, adamw, clip_gradients, losses_postfix, open_run, progress, select_device,
                       set_lr, warmup_cosine)
from .video_clips import CachedClips, batch, clip_source, contrast_augment

log = logging.getLogger(__name__)


@dataclass
class TokenizerRecipe:
    steps: int = 4000
    batch: int = 8
    lr: float = 1e-3
    warmup: int = 200
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.998
    ema_every: int = 1
    mse_weight: float = 40.0         # = the official code's 10·MSE measured in [-1, 1] pixel units
    perceptual_weight: float = 1.0
    gan_weight: float = 0.1
    gan_start: int = 2000            # GAN off for the first steps (the decoder must reconstruct first)
    disc_lr: float = 2e-4
    commitment_weight: float = 0.25
    entropy_weight: float = 0.1
    augment_prob: float = 0.5        # random contrast augmentation
    cache: int = 0                   # > 0: cycle through this many clips kept in memory
    checkpoint_every: int = 250
    log_every: int = 10
    seed: int = 0                    # first clip index used for training
    lora_rank: int = 0               # > 0: train LoRA adapters on top of `init`
    decoder_only: bool = False       # train the decoder alone on `init`: every token stays the same
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    half_weights: bool = False       # store tokenizer.safetensors as fp16 (shipping)
    vgg_weights: str | None = None


@dataclass
class RunPaths:
    out: Path
    init: Path | None = None
    data: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def build_model(preset: Preset, recipe: TokenizerRecipe, init: Path | None) -> CViViT:
    options = {"commitment_weight": recipe.commitment_weight, "entropy_weight": recipe.entropy_weight}
    model = CViViT(preset.tokenizer, lfq_options=options)
    if init is not None:
        base, _ = load_tokenizer(init)
        model.inherit(base)
    elif recipe.decoder_only:
        raise ValueError("decoder-only training needs --init (the tokenizer whose tokens it keeps)")
    if recipe.decoder_only and recipe.lora_rank:
        raise ValueError("choose LoRA or decoder-only training, not both")
    if recipe.decoder_only:
        decoder = set(map(id, model.decoder_parameters()))
        for param in model.parameters():
            param.requires_grad_(id(param) in decoder)
    if recipe.lora_rank:
        if init is None:
            raise ValueError("LoRA training needs --init (a trained tokenizer checkpoint directory)")
        wrapped = apply_lora(model, recipe.lora_rank, recipe.lora_targets, recipe.lora_alpha)
        log.info("LoRA rank %d on %d layers", recipe.lora_rank, len(wrapped))
    return model


def train_tokenizer(
    preset: Preset, recipe: TokenizerRecipe, paths: RunPaths, resume: bool = False, device: str = "auto", workers: int = 0
) -> dict[str, float]:
    """Run (or resume) training; returns the last logged losses. `workers` > 0 (with a
    cache): make the whole clip pool first, in that many processes."""
    if workers and not recipe.cache:
        raise ValueError("workers fill the clip cache: set a cache size")
    dev = select_device(device)
    out = paths.out
    state = TrainingState(out)
    open_run(out, asdict(recipe), resume)
    torch.manual_seed(recipe.seed)
    model = build_model(preset, recipe, paths.init).to(dev)  # refuses a bad recipe before anything is written
    out.mkdir(parents=True, exist_ok=True)
    disc = Discriminator3d(preset.tokenizer.channels).to(dev)
    perceptual = perceptual_loss(recipe.vgg_weights).to(dev)
    trainable = lora_parameters(model) if recipe.lora_rank else [p for p in model.parameters() if p.requires_grad]
    opt = adamw(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay)
    disc_opt = adamw(disc, lr=recipe.disc_lr, weight_decay=0.0, betas=(0.5, 0.9))
    ema = Ema(model, decay=recipe.ema_decay, every=recipe.ema_every)
    step = 0
    if resume and state.exists():
        step, _ = state.load({"model": model, "disc": disc}, {"opt": opt, "disc_opt": disc_opt}, {"ema": ema}, until=recipe.steps)
    elif resume:
        log.warning("no training state in %s: starting a new run", out)
    source = clip_source(paths.data, preset.tokenizer.frames, preset.tokenizer.image_size)
    if recipe.cache:
        source = CachedClips(source, recipe.cache, first=recipe.seed)
        if workers:
            source.fill(workers)
    config = {"recipe": asdict(recipe), "data": paths.data or "simulator", "init": str(paths.init) if paths.init else None, **paths.extra}
    log.info("training tokenizer %s on %s, %d parameters trainable, perceptual=%s, device %s",
             preset.name, config["data"], sum(p.numel() for p in trainable), getattr(perceptual, "name", "?"), dev)

    def save(at: int) -> None:
        # the model files first, the state last: see train_generator._loop
        averaged = copy.deepcopy(model)
        ema.copy_to(averaged)
        if recipe.lora_rank:
            save_lora(averaged, out, step=at, base=str(paths.init), preset=preset.to_dict())
        else:
            dtype = torch.float16 if recipe.half_weights else None
            save_tokenizer(averaged, preset, out, dtype=dtype, step=at, perceptual=getattr(perceptual, "name", None), train=config)
        state.save(at, {"model": model, "disc": disc}, {"opt": opt, "disc_opt": disc_opt}, {"ema": ema}, extra={"config": config})

    logged: dict[str, float] = {}
    aug_gen = torch.Generator()
    bar = progress(range(step, recipe.steps), total=recipe.steps, initial=step, desc="tokenizer")
    t0 = time.perf_counter()
    with open(out / "log.jsonl", "a") as log_file:
        for step in bar:
            model.train()
            first = recipe.seed + step * recipe.batch
            aug_gen.manual_seed(recipe.seed * 1_000_003 + step)
            video = contrast_augment(batch(source, range(first, first + recipe.batch), dev), aug_gen, recipe.augment_prob)
            set_lr(opt, warmup_cosine(step, recipe.lr, recipe.warmup, recipe.steps, recipe.min_lr_ratio))

            gan_on = recipe.gan_weight > 0 and step >= recipe.gan_start
            terms, grad_norm = _train_step(model, disc, perceptual, opt, disc_opt, trainable, video, recipe, gan_on)
            ema.update(model)

            if (step + 1) % recipe.log_every == 0 or step + 1 == recipe.steps:
                logged = {k: float(v.detach()) for k, v in terms.items()} | {"grad": grad_norm}
                bar.set_postfix(losses_postfix({k: logged[k] for k in ("mse", "perc", "ent_codebook", "g", "d")}))
                log_file.write(json.dumps({"step": step + 1, "time_s": round(time.perf_counter() - t0, 2), **logged}) + "\n")
                log_file.flush()
            if (step + 1) % recipe.checkpoint_every == 0 or step + 1 == recipe.steps:
                save(step + 1)
    return logged



def _train_step(
    model: CViViT,
    disc: Discriminator3d,
    perceptual: nn.Module,
    opt: torch.optim.Optimizer,
    disc_opt: torch.optim.Optimizer,
    trainable: list[nn.Parameter],
    video: Tensor,
    recipe: TokenizerRecipe,
    gan_on: bool,
) -> tuple[dict[str, Tensor], float]:
    """One tokenizer update (and one discriminator update when the GAN is on); returns the loss terms."""
    result = model.loss(video, frozen_encoder=recipe.decoder_only)
    zero = result.mse.new_zeros(())
    perc = perceptual(result.recon, video) if recipe.perceptual_weight else zero
    rec = recipe.mse_weight * result.mse + recipe.perceptual_weight * perc
    total = rec + result.lfq.loss
    g_loss = lam = d_loss = zero
    if gan_on:
        g_loss = hinge_g_loss(disc(result.recon))
        # λ at the decoder's last layer; a LoRA run whose last layer is frozen measures it at the output
        anchors = [w for w in model.last_layer_weights() if w.requires_grad] or [result.recon]
        lam = adaptive_gan_weight(rec, g_loss, anchors)
        total = total + recipe.gan_weight * lam * g_loss
    opt.zero_grad(set_to_none=True)
    total.backward()
    grad_norm = clip_gradients(trainable, recipe.grad_clip)
    opt.step()
    if gan_on:
        d_loss = hinge_d_loss(disc(video), disc(result.recon.detach()))
        disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        clip_gradients(disc.parameters(), recipe.grad_clip)
        disc_opt.step()
    terms = {
        "mse": result.mse, "perc": perc, "commit": result.lfq.commitment, "ent_sample": result.lfq.sample_entropy,
        "ent_codebook": result.lfq.codebook_entropy, "g": g_loss, "lam": lam, "d": d_loss,
    }
    return terms, grad_norm
