"""A patient's reference echo loop, read from the file a clinician has.

The generator follows a patient's own heart when it is primed with one cardiac cycle of
that patient's echo (`Generator.prime_loop`): a single frame hardly shows how strongly the
ventricle contracts, a loop does. This module turns a file into that cycle: uint8 frames
(T, size, size), the first at end-diastole (R), the last just before the next R.

    loop = load_reference_loop("patient-7.mp4?frames=12:41", size=64)
    generator.prime_loop(loop.frames, beat_locked=False)

Files: video (.mp4 .avi .mov .mkv .webm through imageio-ffmpeg, .gif through Pillow), DICOM cine loops
(.dcm, through pydicom: uncompressed, RLE, JPEG baseline through Pillow, or whatever codec
plugins are installed; YBR colour comes out as RGB), NumPy
(.npy: T×H×W or T×H×W×C; .npz: a `video` array, or its only array). Colour becomes luma.

Which frames make the cycle, first rule that applies:

1. ``?frames=A:B`` after the path: frames A..B-1 (0-based), from one end-diastole to the
   frame before the next;
2. the file says where the R peaks are: a DICOM's R Wave Pointer (frame numbers from 1),
   or an .npz written by ``echopulse simulate`` (`video_t` and `r_peaks`, seconds): the
   first whole R-to-R cycle;
3. the whole file. When its frame rate says that is longer than one slow beat
   (`LONG_CYCLE_S`), a warning asks for ``?frames=``.

Geometry: ``?crop=X,Y,W,H`` (pixels) cuts that box first; then a non-square frame is cut
to its central square (``?fit=crop``, the default: the sector of an apical view sits in
the middle) or padded with black (``?fit=pad``), and resized with antialiasing.

Every problem is a `ReferenceLoopError` with one line naming the file.
"""
from __future__ import annotations

import gc
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif", ".m4v")
DICOM_SUFFIXES = (".dcm", ".dicom")
NUMPY_SUFFIXES = (".npy", ".npz")
MAX_FRAMES = 4096       # a loop longer than this is not one beat; refuse rather than fill memory
LONG_CYCLE_S = 2.0      # one beat at 30 bpm; a whole file longer than this holds several
_OPTIONS = ("frames", "crop", "fit")


class ReferenceLoopError(ValueError):
    """A reference loop that cannot be used; the message is one line naming the file."""


@dataclass(frozen=True)
class ReferenceLoop:
    """One cardiac cycle of a patient's echo, ready for `Generator.prime_loop(beat_locked=False)`."""

    frames: np.ndarray      # uint8 (T, size, size), end-diastole first
    path: Path
    cycle: str              # how the cycle was chosen, for logs: "frames=12:41", "R wave pointer", ...
    fps: float | None       # the file's frame rate when it says

    def describe(self) -> str:
        rate = f" at {self.fps:g} fps" if self.fps else ""
        return f"{self.path.name}: {len(self.frames)} frames{rate} ({self.cycle})"


def split_spec(spec: str | Path) -> tuple[Path, dict[str, str]]:
    """'PATH?frames=A:B&fit=pad' -> (PATH, options); unknown options are errors."""
    if isinstance(spec, Path):
        return spec, {}
    head, _, query = str(spec).partition("?")
    if not head:
        raise ReferenceLoopError(f"reference {spec!r}: no file named")
    options = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ReferenceLoopError(f"{head}: unknown option {unknown[0]!r}; known: {', '.join(_OPTIONS)}")
    return Path(head), options


def load_reference_loop(spec: str | Path, size: int) -> ReferenceLoop:
    """Read one cardiac cycle from `spec` (a path, optionally with ?frames=, ?crop=, ?fit=)
    as uint8 frames of size × size. Raises ReferenceLoopError."""
    path, options = split_spec(spec)
    if not path.is_file():
        raise ReferenceLoopError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in NUMPY_SUFFIXES:
        video, fps, cycle = _read_numpy(path)
    elif suffix in DICOM_SUFFIXES:
        video, fps, cycle = _read_dicom(path)
    elif suffix in VIDEO_SUFFIXES:
        video, fps, cycle = _read_video(path)
    else:
        known = ", ".join(NUMPY_SUFFIXES + DICOM_SUFFIXES + VIDEO_SUFFIXES)
        raise ReferenceLoopError(f"{path}: unknown reference loop format {suffix or '(none)'!r}; known: {known}")
    gray = _to_gray(path, video)
    gray, how = _select_cycle(path, gray, options.get("frames"), cycle, fps)
    gray = _crop_box(path, gray, options.get("crop"))
    fit = options.get("fit", "crop")
    if fit not in ("crop", "pad"):
        raise ReferenceLoopError(f"{path}: fit must be crop or pad, got {fit!r}")
    return ReferenceLoop(frames=_square_resize(gray, size, fit), path=path, cycle=how, fps=fps)


# readers: each returns (frames T×H×W[×C], fps or None, the first R-to-R cycle (start, stop) or None)

def _read_numpy(path: Path) -> tuple[np.ndarray, float | None, tuple[int, int] | None]:
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as err:  # numpy raises several unrelated types for a bad file
        raise ReferenceLoopError(f"{path}: not a readable NumPy file: {err}") from None
    if isinstance(data, np.ndarray):
        return data, None, None
    with data:
        names = list(data.files)
        key = "video" if "video" in names else (names[0] if len(names) == 1 else None)
        if key is None:
            raise ReferenceLoopError(f"{path}: an .npz reference needs a 'video' array (has {', '.join(names) or 'none'})")
        cycle, fps = None, None
        try:
            video = data[key]
            if "video_t" in names and "r_peaks" in names:
                t = np.asarray(data["video_t"], np.float64)
                if t.ndim == 1 and len(t) == len(video) and len(t) > 1 and np.all(np.diff(t) > 0):
                    fps = 1.0 / float(np.median(np.diff(t)))
                    cycle = _covered_cycle(t, np.asarray(data["r_peaks"], np.float64).ravel(), 1.0 / fps)
        except Exception as err:  # a damaged member, or objects that need pickle
            raise ReferenceLoopError(f"{path}: cannot read its arrays: {err}") from None
    return video, fps, cycle


def _covered_cycle(t: np.ndarray, r_peaks: np.ndarray, step: float) -> tuple[int, int] | None:
    """Frames [start, stop) of the first R-to-R cycle the frame times cover: from the first
    frame at or after one R to the last frame before the next (within one frame step)."""
    eps = 1e-6 * step
    for r0, r1 in zip(r_peaks[:-1], r_peaks[1:]):
        if r0 >= t[0] - eps and r1 <= t[-1] + step + eps:
            start, stop = int(np.searchsorted(t, r0 - eps)), int(np.searchsorted(t, r1 - eps))
            if stop - start >= 2:
                return start, stop
    return None


def _read_dicom(path: Path) -> tuple[np.ndarray, float | None, tuple[int, int] | None]:
    try:
        import pydicom
    except ImportError:
        raise ReferenceLoopError(f"{path}: reading DICOM needs pydicom (pip install pydicom)") from None
    try:
        ds = pydicom.dcmread(path)
        video = ds.pixel_array
    except Exception as err:  # pydicom's errors for a bad file or an unsupported codec vary
        raise ReferenceLoopError(f"{path}: cannot read DICOM pixel data: {err}") from None
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames == 1:
        video = video[None]
    if np.issubdtype(video.dtype, np.integer) and video.dtype != np.uint8:
        bits = int(getattr(ds, "BitsStored", 8) or 8)
        video = video.astype(np.float32) / float(2 ** bits - 1)  # the stored range, not the type's
    fps = None
    if getattr(ds, "FrameTime", None):
        fps = 1000.0 / float(ds.FrameTime)
    elif getattr(ds, "CineRate", None):
        fps = float(ds.CineRate)
    pointer = getattr(ds, "RWavePointer", None)
    cycle = None
    if pointer is not None:
        marks = sorted({int(v) - 1 for v in np.atleast_1d(np.asarray(pointer, dtype=np.int64))})  # counted from 1
        marks = [m for m in marks if 0 <= m < len(video)]
        if len(marks) >= 2:
            cycle = (marks[0], marks[1])
        else:
            log.warning("%s: the R Wave Pointer marks fewer than two frames; the whole file is taken as one cycle", path)
    return video, fps, cycle


def _read_video(path: Path) -> tuple[np.ndarray, float | None, tuple[int, int] | None]:
    if path.suffix.lower() == ".gif":
        return _read_gif(path)
    import imageio_ffmpeg

    frames: list[np.ndarray] = []
    failure = ""
    with warnings.catch_warnings():
        # when ffmpeg fails, imageio-ffmpeg leaves its pipes for the collector to close
        warnings.simplefilter("ignore", ResourceWarning)
        reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="gray", bits_per_pixel=8)  # ffmpeg takes the luma
        try:
            meta = next(reader)
            width, height = meta["size"]
            for data in reader:
                frames.append(np.frombuffer(data, np.uint8).reshape(height, width))
                if len(frames) > MAX_FRAMES:
                    break
        except Exception as err:  # ffmpeg's failures arrive as OSError or RuntimeError carrying its log
            failure = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        finally:
            reader.close()
            del reader
            gc.collect()
    if len(frames) > MAX_FRAMES:
        raise ReferenceLoopError(f"{path}: more than {MAX_FRAMES} frames; cut one cardiac cycle out first")
    if failure and not frames:
        raise ReferenceLoopError(f"{path}: cannot decode video: {failure}")
    if failure:
        log.warning("%s: decoding stopped after %d frames: %s", path, len(frames), failure)
    if not frames:
        raise ReferenceLoopError(f"{path}: the video has no frames")
    fps = meta.get("fps")
    fps = float(fps) if isinstance(fps, (int, float)) and np.isfinite(fps) and fps > 0 else None
    return np.stack(frames), fps, None


def _read_gif(path: Path) -> tuple[np.ndarray, float | None, tuple[int, int] | None]:
    from PIL import Image, ImageSequence, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            frames = [np.asarray(frame.convert("L")) for frame in ImageSequence.Iterator(image)]
            duration_ms = image.info.get("duration")
    except (OSError, UnidentifiedImageError) as err:
        raise ReferenceLoopError(f"{path}: cannot decode GIF: {err}") from None
    if len(frames) > MAX_FRAMES:
        raise ReferenceLoopError(f"{path}: more than {MAX_FRAMES} frames; cut one cardiac cycle out first")
    fps = 1000.0 / duration_ms if isinstance(duration_ms, (int, float)) and duration_ms > 0 else None
    return np.stack(frames), fps, None


# processing

def _to_gray(path: Path, video: np.ndarray) -> np.ndarray:
    """Frames T×H×W(×C) of any numeric type -> float32 T×H×W in [0, 255]."""
    video = np.asarray(video)
    if video.dtype.kind not in "uif" or video.dtype == np.bool_:
        raise ReferenceLoopError(f"{path}: pixels must be numbers, got {video.dtype}")
    normalised = video.dtype.kind == "f"  # float frames may be in [0, 1]; integers are 0-255
    if video.ndim == 4 and video.shape[-1] in (1, 3, 4):
        if video.shape[-1] == 1:
            video = video[..., 0]
        else:  # luma of RGB(A), alpha ignored
            video = video[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    if video.ndim != 3:
        raise ReferenceLoopError(f"{path}: expected frames T×H×W or T×H×W×C (C = 1, 3, 4), got shape {video.shape}")
    if len(video) > MAX_FRAMES:
        raise ReferenceLoopError(f"{path}: more than {MAX_FRAMES} frames; cut one cardiac cycle out first")
    video = video.astype(np.float32, copy=False)
    if not np.isfinite(video).all():
        raise ReferenceLoopError(f"{path}: pixels hold NaN or infinity")
    if normalised and video.size and video.min() >= 0 and video.max() <= 1.0:
        video = video * 255.0
    return np.clip(video, 0, 255)


def _select_cycle(path: Path, video: np.ndarray, frames: str | None, cycle: tuple[int, int] | None,
                  fps: float | None) -> tuple[np.ndarray, str]:
    count = len(video)
    if frames is not None:
        start, stop = _parse_range(path, frames, count)
        return video[start:stop], f"frames={start}:{stop}"
    if cycle is not None:
        start, stop = cycle
        return video[start:stop], f"the file's first R-to-R cycle, frames {start}:{stop}"
    if count < 2:
        raise ReferenceLoopError(f"{path}: a reference loop needs at least 2 frames of one cardiac cycle, got {count}")
    if fps and count / fps > LONG_CYCLE_S:
        log.warning("%s: %.1f s of video taken as one cardiac cycle; if it holds several beats, add "
                    "?frames=A:B (from one end-diastole to the frame before the next)", path, count / fps)
    return video, "whole file"


def _parse_range(path: Path, text: str, count: int) -> tuple[int, int]:
    start_text, sep, stop_text = text.partition(":")
    try:
        start, stop = int(start_text), int(stop_text)
    except ValueError:
        raise ReferenceLoopError(f"{path}: frames must be A:B (0-based, B excluded), got {text!r}") from None
    if not sep or not 0 <= start < stop <= count:
        raise ReferenceLoopError(f"{path}: frames {text!r} outside the file's {count} frames (0-based, B excluded)")
    if stop - start < 2:
        raise ReferenceLoopError(f"{path}: frames {text!r} hold fewer than 2 frames")
    return start, stop


def _crop_box(path: Path, video: np.ndarray, box: str | None) -> np.ndarray:
    if box is None:
        return video
    try:
        x, y, w, h = (int(v) for v in box.split(","))
    except ValueError:
        raise ReferenceLoopError(f"{path}: crop must be X,Y,W,H in pixels, got {box!r}") from None
    height, width = video.shape[1:]
    if x < 0 or y < 0 or w < 1 or h < 1 or x + w > width or y + h > height:
        raise ReferenceLoopError(f"{path}: crop {box!r} leaves the {width}x{height} frame")
    return video[:, y:y + h, x:x + w]


def _square_resize(video: np.ndarray, size: int, fit: str) -> np.ndarray:
    _, height, width = video.shape
    side = min(height, width) if fit == "crop" else max(height, width)
    if fit == "crop":
        top, left = (height - side) // 2, (width - side) // 2
        square = video[:, top:top + side, left:left + side]
    else:  # black bars, as around an ultrasound sector
        square = np.zeros((len(video), side, side), np.float32)
        top, left = (side - height) // 2, (side - width) // 2
        square[:, top:top + height, left:left + width] = video
    if side != size:
        tensor = torch.from_numpy(np.ascontiguousarray(square, dtype=np.float32))[:, None]
        square = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=side > size,
                               align_corners=False)[:, 0].numpy()
    return np.clip(np.round(square), 0, 255).astype(np.uint8)

