"""The `Generator` facade: ECG beats in, echo frames out, one beat at a time.

    gen = Generator.load()                       # the shipped tiny model (core/weights/tiny/)
    gen.prime_loop(reference_clip)               # or gen.prime_image(frame)
    frames, times = gen.generate_beat(window, valid, r_time, rr)

Each beat's clip is beat-locked like the training clips: token step 0 is the prime frame
(the previous beat's last frame, at phase -1/F), frames 1..F sit at r_time + (i-1)·rr/F for
i = 1..F (F = frames - 1 = 10 for the presets). Only frames 1..F are returned; the last
of them is re-encoded through the causal tokenizer (a clip of one frame encodes to the
same tokens as frame 0 of a full clip) and primes the next beat, so a seam never
repeats a frame.

Patient context. A single end-diastolic frame hardly shows how strongly the ventricle
contracts; a loop does. `prime_loop` encodes one beat of the patient's echo into the
tokenizer's full token grid and keeps those tokens as a second segment of the
cross-attention context (after the ECG patches, with a segment embedding; see
`core/transformer.py`). The transformer was trained with the reference loop present
(another beat of the same subject) or withheld, so both priming modes work; the
reference stays in both halves of the classifier-free guidance batch, so guidance
amplifies the ECG, not the reference.
"""
from __future__ import annotations

import math

import dataclasses

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .checkpoint import load_json
from .config import Preset, preset as named_preset
from .errors import CheckpointError
from .critic import TokenCritic, load_critic
from .ecg_encoder import EcgEncoder, load_ecg_encoder
from .sampler import Generators, Schedule, decode, make_schedule
from .tokenizer import CViViT, from_uint8, load_tokenizer, to_uint8, token_space_sha256
from .transformer import EcgFeatures, MaskedTransformer, build_transformer, key_layout, load_transformer
from .training import select_device

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "tiny"


def beat_locked_clip(cycle: np.ndarray, frames: int) -> np.ndarray:
    """Resample one cardiac cycle (T, H, W), frame j at phase j/T from R, to a beat-locked
    clip of `frames` frames: frame 0 at phase -1/(frames-1) (periodic), frame i at (i-1)/(frames-1)."""
    count = cycle.shape[0]
    span = frames - 1
    phases = (np.arange(frames) - 1) / span % 1.0
    pos = phases * count
    lo = np.floor(pos).astype(np.int64) % count
    hi = (lo + 1) % count
    w = (pos - np.floor(pos))[:, None, None]
    clip = cycle[lo].astype(np.float32) * (1 - w) + cycle[hi].astype(np.float32) * w
    return np.clip(np.round(clip), 0, 255).astype(np.uint8)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# what the transformer was built around, field by field: the tokenizer's geometry and
# codebook, the ECG encoder's window and width (a refiner or a longer-trained decoder is free)
_TOKENIZER_GEOMETRY = ("frames", "image_size", "patch", "temporal_patch", "lfq_bits")
_ECG_GEOMETRY = ("fs", "patch", "window_s", "pre_r_s", "dim")


def _check_parts_agree(directory: Path, preset: Preset, tokenizer: Preset, ecg: Preset) -> None:
    """Refuse a folder whose parts were made for different models, naming the first field
    that differs, before the first beat fails deep inside a forward pass."""
    for part, made, fields in (("tokenizer", tokenizer.tokenizer, _TOKENIZER_GEOMETRY), ("ecg", ecg.ecg, _ECG_GEOMETRY)):
        built_for = getattr(preset, part)
        for key in fields:
            if getattr(made, key) != getattr(built_for, key):
                raise CheckpointError(f"{directory / (part + '.json')}: {part}.{key} is {getattr(made, key)!r}, "
                                      f"but transformer.json was built for {getattr(built_for, key)!r}")


def _check_token_space(directory: Path) -> None:
    """Refuse a tokenizer whose tokens are not the ones the transformer learned. The pin is
    the encoder side's digest (a retrained decoder keeps it); checkpoints from before it
    pinned the whole tokenizer file."""
    meta = load_json(directory / "transformer.json")
    weights = directory / "tokenizer.safetensors"
    if "tokenizer_tokens_sha256" in meta:
        same = meta["tokenizer_tokens_sha256"] == token_space_sha256(weights)
    elif "tokenizer_sha256" in meta:
        same = meta["tokenizer_sha256"] == file_sha256(weights)
    else:
        return
    if not same:
        raise ValueError(
            f"{directory}: the tokenizer does not make the tokens the transformer was trained on; "
            "retrain the transformer (echopulse train transformer --init ...) or restore the tokenizer"
        )


def _device(device: str | torch.device | None) -> torch.device:
    """None: CUDA when there is one, else CPU; a CUDA device this machine lacks is a RuntimeError."""
    return select_device("auto" if device is None else str(device))


@dataclass
class StreamState:
    """What one ECG stream carries from beat to beat: the prime frame's tokens and the
    patient's reference loop. The model is shared; one state per device (`new_state`)."""

    prime: Tensor | None      # (1, h·w) tokens of the frame before the next R; None until primed
    ref_ids: Tensor           # (1, N) reference-loop tokens (zeros when none)
    ref_valid: Tensor         # (1,) bool


class Generator:
    """Resident model for beat-by-beat echo generation (batch 1 facade over batched parts).

    Prime and reference live in a `StreamState`: `self.state` by default, or one passed
    per call, so one resident model can serve many devices.
    """

    def __init__(
        self,
        preset: Preset,
        tokenizer: CViViT,
        ecg_encoder: EcgEncoder,
        transformer: MaskedTransformer,
        critic: TokenCritic | None = None,
        device: str | torch.device | None = None,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        self.preset = preset
        self.name = name or preset.name
        self.device = _device(device)
        self.tokenizer = tokenizer.to(self.device).eval()
        self.ecg_encoder = ecg_encoder.to(self.device).eval()
        self.transformer = transformer.to(self.device).eval()
        self.critic = critic.to(self.device).eval() if critic is not None else None
        self.schedule: Schedule = self._schedule()
        self._rng = torch.Generator(device=self.device).manual_seed(seed)
        self.state = self.new_state()

    def _schedule(self) -> Schedule:
        tcfg = self.preset.transformer
        model = self.transformer
        return make_schedule(tcfg.steps, model.num_tokens - model.prime_tokens, tcfg.temperature,
                             tcfg.confidence_noise, tcfg.cfg_scale, self.device)

    def set_sampling(
        self,
        steps: int | None = None,
        cfg_scale: float | None = None,
        temperature: float | None = None,
        confidence_noise: float | None = None,
    ) -> None:
        """Change the sampling settings (None keeps one). They live in this generator's
        preset copy, so views made from it (`new_state` users, the engine) share them."""
        changes = {k: v for k, v in dict(steps=steps, cfg_scale=cfg_scale, temperature=temperature,
                                          confidence_noise=confidence_noise).items() if v is not None}
        if "steps" in changes and not 1 <= changes["steps"] <= self.transformer.num_tokens - self.transformer.prime_tokens:
            raise ValueError(f"steps must be between 1 and the number of generated tokens, got {changes['steps']}")
        if not all(math.isfinite(changes.get(k, 0)) and changes.get(k, 0) >= 0
                   for k in ("cfg_scale", "temperature", "confidence_noise")):
            raise ValueError("cfg_scale, temperature and confidence_noise must be finite and >= 0")
        self.preset = dataclasses.replace(self.preset, transformer=dataclasses.replace(self.preset.transformer, **changes))
        self.schedule = self._schedule()

    # construction

    @classmethod
    def load(
        cls,
        path_or_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        use_critic: bool = False,
        seed: int = 0,
    ) -> "Generator":
        """Load tokenizer.*, ecg.*, transformer.* and (with `use_critic`, if present) critic.*
        from a directory (or the directory of a file in it); None loads the shipped tiny model.
        device None: CUDA when available. The critic is off by default: it adds a forward
        pass per step (tiny on 2 CPU cores: ~200 -> ~280 ms per beat) for no measured gain yet."""
        directory = Path(path_or_dir) if path_or_dir is not None else DEFAULT_WEIGHTS
        if directory.is_file():
            directory = directory.parent
        if not (directory / "transformer.json").is_file():
            raise FileNotFoundError(f"no generator checkpoint in {directory} (expected transformer.json and .safetensors)")
        device = _device(device)
        _check_token_space(directory)
        tokenizer, tokenizer_preset = load_tokenizer(directory, device=device)
        ecg, ecg_preset = load_ecg_encoder(directory, device=device)
        transformer, preset = load_transformer(directory, device=device)
        _check_parts_agree(directory, preset, tokenizer_preset, ecg_preset)
        critic = None
        if use_critic and (directory / "critic.json").is_file():
            critic, _ = load_critic(directory, device=device)
        log.info("loaded generator from %s (critic: %s)", directory, critic is not None)
        shipped = directory.resolve() == DEFAULT_WEIGHTS.resolve()
        name = preset.name if shipped else f"{preset.name}:{directory.name}"
        return cls(preset, tokenizer, ecg, transformer, critic, device=device, seed=seed, name=name)

    @classmethod
    def untrained(cls, preset: Preset | str = "tiny", device: str | torch.device | None = None, seed: int = 0) -> "Generator":
        """Randomly initialised parts (tests, speed benchmarks): the output is noise."""
        p = named_preset(preset) if isinstance(preset, str) else preset
        with torch.random.fork_rng():  # reproducible weights without touching the caller's RNG
            torch.manual_seed(seed)
            parts = (CViViT(p.tokenizer), EcgEncoder(p.ecg), build_transformer(p))
        return cls(p, *parts, None, device=device, seed=seed, name=f"{p.name}:untrained")

    @classmethod
    def default(cls, device: str | torch.device | None = None, seed: int = 0) -> "Generator":
        """The shipped tiny model; before one is shipped, an untrained tiny model (with a warning)."""
        if (DEFAULT_WEIGHTS / "transformer.json").is_file():
            return cls.load(None, device=device, seed=seed)
        log.warning("no shipped model in %s: using an UNTRAINED tiny generator (its output is noise)", DEFAULT_WEIGHTS)
        return cls.untrained("tiny", device=device, seed=seed)

    # priming

    @property
    def frames_per_beat(self) -> int:
        return self.preset.tokenizer.frames - 1

    def _frames_tensor(self, frames: np.ndarray | Tensor) -> Tensor:
        size = self.preset.tokenizer.image_size
        arr = torch.as_tensor(np.asarray(frames))
        if arr.dtype != torch.uint8 or tuple(arr.shape[-2:]) != (size, size):
            raise ValueError(f"expected uint8 frames of {size}x{size}, got {arr.dtype} {tuple(arr.shape)}")
        return from_uint8(arr).to(self.device)

    def new_state(self) -> StreamState:
        """An unprimed stream state (no prime, no reference)."""
        n = self.transformer.num_tokens
        return StreamState(
            prime=None,
            ref_ids=torch.zeros(1, n, dtype=torch.long, device=self.device),
            ref_valid=torch.zeros(1, dtype=torch.bool, device=self.device),
        )

    @torch.inference_mode()
    def prime_image(self, frame: np.ndarray | Tensor, keep_reference: bool = False, state: StreamState | None = None) -> None:
        """Start from one frame (uint8 H×W), taken as the frame just before the next R peak.

        The reference loop is forgotten unless `keep_reference` (same patient, new prime)."""
        st = state or self.state
        size = self.preset.tokenizer.image_size
        if frame.dtype not in (np.uint8, torch.uint8) or tuple(frame.shape) != (size, size):
            # a whole loop here would only fail at the next beat
            raise ValueError(f"a prime image is one uint8 frame of {size}x{size}, got {frame.dtype} {tuple(frame.shape)}")
        video = self._frames_tensor(frame[None])
        st.prime = self.tokenizer.encode(video).flatten(1)
        if not keep_reference:
            st.ref_ids = torch.zeros_like(st.ref_ids)
            st.ref_valid = torch.zeros_like(st.ref_valid)

    @torch.inference_mode()
    def prime_loop(self, frames: np.ndarray | Tensor, beat_locked: bool = True, state: StreamState | None = None) -> None:
        """Start from a reference loop of the patient (uint8 T×H×W) and keep it as context.

        beat_locked=True: the clip layout (T = preset frames; frame 0 the previous beat's
        last frame, frames 1.. from this beat's R at steps of RR/(T-1)).
        beat_locked=False: any T frames of one cycle from R to the next R, evenly spaced;
        resampled to the clip layout. The loop's last frame becomes the prime.
        """
        st = state or self.state
        frames = np.asarray(frames)
        count, size = self.preset.tokenizer.frames, self.preset.tokenizer.image_size
        if frames.dtype != np.uint8 or frames.ndim != 3 or frames.shape[1:] != (size, size) or len(frames) < 2:
            # checked before any resampling, which would cast a float loop to near-black uint8
            raise ValueError(f"a reference loop is uint8 frames of {size}x{size}, at least 2, got {frames.dtype} {frames.shape}")
        if not beat_locked:
            frames = beat_locked_clip(frames, count)
        if frames.ndim != 3 or frames.shape[0] != count:
            raise ValueError(f"a beat-locked reference loop has {count} frames, got shape {frames.shape}")
        video = self._frames_tensor(frames)
        st.ref_ids = self.tokenizer.encode(video).flatten(1)
        st.ref_valid = torch.ones(1, dtype=torch.bool, device=self.device)
        st.prime = self.tokenizer.encode(video[:, :, -1:]).flatten(1)

    def prime_default(self, state: StreamState | None = None) -> None:
        """Prime with the simulator's standard subject (seed 0, normal EF): for streams that
        start without an echo of the patient. Logged, since the EF then is not the patient's."""
        from .simulate.paired import simulate_pair

        tok = self.preset.tokenizer
        log.warning("no prime given: starting from the simulator's standard subject")
        self.prime_image(simulate_pair(seed=0, size=tok.image_size, frames=tok.frames)["video"][-1], state=state)

    def reset(self, state: StreamState | None = None) -> None:
        """Forget the prime and the reference loop."""
        st = state or self.state
        fresh = self.new_state()
        st.prime, st.ref_ids, st.ref_valid = fresh.prime, fresh.ref_ids, fresh.ref_valid

    # generation

    @torch.inference_mode()
    def sample_tokens(
        self,
        prime: Tensor,
        window: Tensor,
        valid: Tensor,
        lead_ids: Tensor,
        rr: Tensor,
        ref_ids: Tensor,
        ref_valid: Tensor,
        generator: Generators = None,
    ) -> Tensor:
        """Batched: prime tokens (B, h·w), ECG windows (B, L, S) -> clip tokens (B, N).
        `generator`: one per row makes each row's tokens independent of the others
        (`sampler.gumbel_noise`)."""
        model = self.transformer
        ecg = EcgFeatures(*self.ecg_encoder.encode(window, valid, lead_ids))
        # the cheapest exact key layout, and the context's keys and values once for all steps
        ecg_whole = torch.broadcast_to(valid, window.shape).flatten(1).all(1)
        layout = key_layout(ref_valid.tolist(), ecg_whole.tolist())
        context2 = model.with_keys_values(model.guidance_context(ecg, rr, ref_ids, ref_valid, layout))
        ids = torch.full((prime.shape[0], model.num_tokens), model.mask_id, dtype=torch.long, device=self.device)
        ids[:, : model.prime_tokens] = prime
        critic_context = None
        if self.critic is not None:
            critic_context = self.critic.with_keys_values(self.critic.condition(ecg, rr, ref_ids, ref_valid, layout=layout))
        return decode(model, ids, context2, self.schedule, generator, self.critic, critic_context)

    @torch.inference_mode()
    def generate_beat(
        self,
        window: np.ndarray | Tensor,
        valid: np.ndarray | Tensor,
        r_time: float,
        rr: float,
        seed: int | None = None,
        lead_ids: np.ndarray | Tensor | None = None,
        state: StreamState | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Frames of one beat: (F, H, W) uint8 and their times (F,) s = r_time + i·rr/F.

        window (L, S) / valid (S,) or (L, S) from `core.beat_window.beat_window`;
        lead_ids (L,) default 0..L-1. seed fixes this beat's sampling; None continues the
        generator's own random stream. An unprimed state is primed with `prime_default`.
        """
        st = state or self.state
        if st.prime is None:
            self.prime_default(st)
        if not (rr > 0 and math.isfinite(rr)):
            raise ValueError(f"rr must be positive and finite, got {rr}")
        w = torch.as_tensor(np.asarray(window, dtype=np.float32), device=self.device)
        if w.ndim == 1:
            w = w[None]
        if w.ndim != 2 or not 1 <= w.shape[0] <= self.preset.ecg.max_leads:
            raise ValueError(f"window must be (leads <= {self.preset.ecg.max_leads}, samples), got {tuple(w.shape)}")
        v = torch.as_tensor(np.asarray(valid, dtype=bool), device=self.device)
        if tuple(v.shape) not in ((w.shape[1],), (1, w.shape[1]), tuple(w.shape)):
            raise ValueError(f"valid must be (samples,) or (leads, samples) like the window {tuple(w.shape)}, "
                             f"got {tuple(v.shape)}")
        v = v.expand_as(w)
        # a NaN marked valid would make every patch embedding NaN through attention: it is
        # missing data, so it becomes what `beat_window` makes of a gap (zero, not valid)
        finite = torch.isfinite(w)
        v, w = v & finite, torch.where(finite, w, torch.zeros((), device=self.device))
        leads = torch.arange(w.shape[0]) if lead_ids is None else torch.as_tensor(lead_ids, dtype=torch.long)
        # one id per row of the window: a shorter list would be broadcast over every lead
        if leads.shape != (w.shape[0],) or not bool(((leads >= 0) & (leads < self.preset.ecg.max_leads)).all()):
            raise ValueError(f"lead_ids must give each of the {w.shape[0]} leads an id in 0..{self.preset.ecg.max_leads - 1}, "
                             f"got {leads.tolist()}")
        leads = leads.to(self.device)
        rng = self._rng if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        rr_t = torch.tensor([float(rr)], device=self.device)
        ids = self.sample_tokens(st.prime, w[None], v[None], leads, rr_t, st.ref_ids, st.ref_valid, rng)
        video = self.tokenizer.decode_indices(ids.view(1, *self.transformer.grid))  # (1, 1, T, H, W)
        frames_u8 = to_uint8(video[0, 0, 1:])  # frame 0 is the prime: never emitted again
        # the next beat starts from exactly the pixels emitted last, re-encoded causally
        st.prime = self.tokenizer.encode(from_uint8(frames_u8[-1:]).to(self.device)).flatten(1)
        frames = frames_u8.cpu().numpy()
        count = self.frames_per_beat
        times = r_time + np.arange(count, dtype=np.float64) * rr / count
        return frames, times
