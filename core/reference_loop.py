"""A patient's reference echo loop, read from the file a clinician has.

The generator follows a patient's own heart when it is primed with one cardiac cycle of
that patient's echo (`Generator.prime_loop`): a single frame hardly shows how strongly the
ventricle contracts, a loop does. This module turns a file into that cycle: uint8 frames
(T, size, size), the first at end-diastole (R), the last just before the next R.

    loop = load_reference_loop("patient-7.mp4?frames=12:41", size=64)
    generator.prime_loop(loop.frames, beat_locked=False)

Files: video (.mp4 .avi .mov .mkv .webm through imageio-ffmpeg, .gif through Pillow), DICOM cine loops
(.dcm, through pydicom: uncompressed, RLE, JPEG baseline through Pillow, or whatever codec
plugins are installed; YBR colour comes out as RGB, palette colour through its table,
MONOCHROME1 inverted), NumPy (.npy: T×H×W or T×H×W×C, integers 0-255 or floats 0-1 or
0-255; .npz: a `video` array, or its only array). Colour becomes luma.

Which frames make the cycle, first rule that applies:

1. ``?frames=A:B`` after the path: frames A..B-1 (0-based), from one end-diastole to the
   frame before the next;
2. the file says where the R peaks are: a DICOM's R Wave Pointer (frame numbers from 1),
   or an .npz written by ``echopulse simulate`` (`video_t` and `r_peaks`, seconds): the
   first whole R-to-R cycle of at least 2 frames (an .npz whose frames hold none is refused:
   the whole file would not start at R). A DICOM that marks a single R: one beat from it,
   its length from the file's Nominal Interval or Heart Rate and frame rate, else from the
   mark to the end of the file with a warning;
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
MAX_VIDEO_BYTES = 1 << 30  # decoded gray pixels of a video file: 1 GiB is 500 frames of 1080p
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
    video = _check_frames(path, video)
    # the cycle first: a long recording is converted only where it is used
    video, how = _select_cycle(path, video, options.get("frames"), cycle, fps)
    gray = _crop_box(path, _to_gray(path, video), options.get("crop"))
    fit = options.get("fit", "crop")
    if fit not in ("crop", "pad"):
        raise ReferenceLoopError(f"{path}: fit must be crop or pad, got {fit!r}")
    return ReferenceLoop(frames=_square_resize(gray, size, fit), path=path, cycle=how, fps=fps)


# readers: each returns (frames T×H×W[×C], fps or None, Cycle)
Cycle = tuple[int, int] | str | None  # the first R-to-R (start, stop); why the file's R marks give none; no marks


def _read_numpy(path: Path) -> tuple[np.ndarray, float | None, Cycle]:
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)  # an .npy is read where ?frames= picks
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
                    r_peaks = np.asarray(data["r_peaks"], np.float64).ravel()
                    r_peaks = np.sort(r_peaks[np.isfinite(r_peaks)])
                    if len(r_peaks):  # the file says where R is: the whole file would not start there
                        cycle = _covered_cycle(t, r_peaks, 1.0 / fps) or (
                            f"its R peaks leave no whole R-to-R cycle in its frames ({t[0]:.2f}-{t[-1]:.2f} s)")
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


def _read_dicom(path: Path) -> tuple[np.ndarray, float | None, Cycle]:
    try:
        import pydicom
    except ImportError:
        raise ReferenceLoopError(f"{path}: reading DICOM needs pydicom (pip install pydicom)") from None
    try:
        ds = pydicom.dcmread(path)
        video = ds.pixel_array
    except Exception as err:  # pydicom's errors for a bad file or an unsupported codec vary
        raise ReferenceLoopError(f"{path}: cannot read DICOM pixel data: {err}") from None
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if video.ndim == (2 if samples == 1 else 3):  # one frame (NumberOfFrames may be absent: pydicom counts)
        video = video[None]
    video = _dicom_levels(path, ds, video)
    pointer = getattr(ds, "RWavePointer", None)
    fps = _dicom_fps(ds)
    cycle = None
    if pointer is not None:
        marks = sorted({int(v) - 1 for v in np.atleast_1d(np.asarray(pointer, dtype=np.int64))})  # counted from 1
        marks = [m for m in marks if 0 <= m < len(video)]
        # marks on adjacent frames would make a 1-frame cycle, which the generator refuses
        pairs = [(a, b) for a, b in zip(marks, marks[1:]) if b - a >= 2]
        if pairs:
            cycle = pairs[0]
        elif len(marks) >= 2:
            log.warning("%s: the R Wave Pointer marks no cycle of 2 frames or more; the whole file is taken as one "
                        "cycle", path)
        elif len(marks) == 1:
            cycle = _cycle_at_one_mark(path, marks[0], len(video), fps, _dicom_rr_s(ds))
        else:
            log.warning("%s: the R Wave Pointer marks no frame of the file; the whole file is taken as one cycle", path)
    return video, fps, cycle


def _cycle_at_one_mark(path: Path, mark: int, count: int, fps: float | None, rr_s: float | None) -> Cycle:
    """A cine loop often marks a single R. One beat from it when the file gives the R-R
    interval and the frame rate (the beat before the mark when the file ends sooner);
    else from the mark to the end of the file, which a warning asks to check."""
    if fps and rr_s:
        length = round(rr_s * fps)
        if length >= 2 and mark + length <= count:
            return mark, mark + length
        if length >= 2 and mark - length >= 0:
            return mark - length, mark
    if count - mark >= 2:
        log.warning("%s: the R Wave Pointer marks one frame (%d) and the file gives no R-R interval (Nominal Interval "
                    "or Heart Rate) that fits; frames %d:%d are taken as one cycle: add ?frames=A:B if they hold "
                    "several beats", path, mark, mark, count)
        return mark, count
    log.warning("%s: the R Wave Pointer marks only the last frame; the whole file is taken as one cycle", path)
    return None


def _dicom_rr_s(ds: object) -> float | None:
    """The R-R interval (s) the file was acquired at: Nominal Interval (ms), else Heart Rate
    (beats per minute); None when neither is a plausible number."""
    for key, to_s in (("NominalInterval", lambda v: v / 1000.0), ("HeartRate", lambda v: 60.0 / v if v else 0.0)):
        try:
            rr = to_s(float(getattr(ds, key, None) or "nan"))
        except (TypeError, ValueError):  # a malformed number string
            continue
        if np.isfinite(rr) and 0.2 <= rr <= 3.0:  # 20 to 300 bpm
            return rr
    return None


def _dicom_levels(path: Path, ds: object, video: np.ndarray) -> np.ndarray:
    """Stored values -> uint8, or float in [0, 1], with white the brightest echo: palette
    indices looked up, signed values shifted, MONOCHROME1 (lowest value white) inverted."""
    photometric = str(getattr(ds, "PhotometricInterpretation", "")).strip().upper()
    bits = int(getattr(ds, "BitsStored", 8) or 8)
    if photometric == "PALETTE COLOR":  # the stored values are indices into a colour table
        from pydicom.pixels import apply_color_lut

        try:
            video = apply_color_lut(video, ds)
        except Exception as err:  # a missing or malformed table
            raise ReferenceLoopError(f"{path}: cannot apply its colour palette: {err}") from None
        bits = 8 if video.dtype == np.uint8 else 16
    if np.issubdtype(video.dtype, np.integer) and video.dtype != np.uint8:
        shift = 2.0 ** (bits - 1) if np.issubdtype(video.dtype, np.signedinteger) else 0.0  # two's complement
        video = np.clip((video.astype(np.float32) + shift) / float(2 ** bits - 1), 0.0, 1.0)  # the stored range
    if photometric == "MONOCHROME1":
        video = 255 - video if video.dtype == np.uint8 else 1.0 - video
    return video


def _dicom_fps(ds: object) -> float | None:
    """Frame Time (ms) or Cine Rate as frames per second; None when neither is a usable number."""
    for key in ("FrameTime", "CineRate"):
        try:
            value = float(getattr(ds, key, None) or "nan")
        except (TypeError, ValueError):  # a malformed decimal string
            continue
        if np.isfinite(value) and value > 0:
            return 1000.0 / value if key == "FrameTime" else value
    return None


def _read_video(path: Path) -> tuple[np.ndarray, float | None, Cycle]:
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
                if len(frames) > MAX_FRAMES or len(frames) * width * height > MAX_VIDEO_BYTES:
                    break
        except Exception as err:  # ffmpeg's failures arrive as OSError or RuntimeError carrying its log
            failure = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        finally:
            reader.close()
            del reader
            gc.collect()
    if len(frames) > MAX_FRAMES or sum(f.size for f in frames) > MAX_VIDEO_BYTES:
        raise ReferenceLoopError(f"{path}: more than {min(len(frames), MAX_FRAMES)} frames or "
                                 f"{MAX_VIDEO_BYTES >> 20} MiB of pixels; cut one cardiac cycle out first")
    if failure and not frames:
        raise ReferenceLoopError(f"{path}: cannot decode video: {failure}")
    if failure:
        log.warning("%s: decoding stopped after %d frames: %s", path, len(frames), failure)
    if not frames:
        raise ReferenceLoopError(f"{path}: the video has no frames")
    fps = meta.get("fps")
    fps = float(fps) if isinstance(fps, (int, float)) and np.isfinite(fps) and fps > 0 else None
    return np.stack(frames), fps, None


def _read_gif(path: Path) -> tuple[np.ndarray, float | None, Cycle]:
    from PIL import Image, ImageSequence, UnidentifiedImageError

    frames: list[np.ndarray] = []
    durations: list[float] = []
    try:
        with Image.open(path) as image:
            for frame in ImageSequence.Iterator(image):
                frames.append(np.asarray(frame.convert("L")))
                duration = frame.info.get("duration")  # per frame: a loop often pauses on its last
                if isinstance(duration, (int, float)) and duration > 0:
                    durations.append(float(duration))
                if len(frames) > MAX_FRAMES:
                    break
    except (OSError, UnidentifiedImageError) as err:
        raise ReferenceLoopError(f"{path}: cannot decode GIF: {err}") from None
    if len(frames) > MAX_FRAMES:
        raise ReferenceLoopError(f"{path}: more than {MAX_FRAMES} frames; cut one cardiac cycle out first")
    fps = 1000.0 / float(np.median(durations)) if durations else None
    return np.stack(frames), fps, None


# processing

def _check_frames(path: Path, video: np.ndarray) -> np.ndarray:
    """Frames T×H×W(×C) of a numeric type, checked before anything is copied."""
    video = np.asarray(video)
    if video.dtype.kind not in "uif" or video.dtype == np.bool_:
        raise ReferenceLoopError(f"{path}: pixels must be numbers, got {video.dtype}")
    if not (video.ndim == 3 or (video.ndim == 4 and video.shape[-1] in (1, 3, 4))):
        raise ReferenceLoopError(f"{path}: expected frames T×H×W or T×H×W×C (C = 1, 3, 4), got shape {video.shape}")
    if len(video) > MAX_FRAMES:
        raise ReferenceLoopError(f"{path}: more than {MAX_FRAMES} frames; cut one cardiac cycle out first")
    if 0 in video.shape[1:3]:
        raise ReferenceLoopError(f"{path}: empty frames, {video.shape[2]}x{video.shape[1]} pixels")
    return video


def _to_gray(path: Path, video: np.ndarray) -> np.ndarray:
    """Frames T×H×W(×C) that passed `_check_frames` -> float32 T×H×W in [0, 255]."""
    normalised = video.dtype.kind == "f"  # float frames may be in [0, 1]; integers are 0-255
    if video.dtype.kind in "ui" and video.size and video.max() > 255:  # clipping would turn the heart white
        raise ReferenceLoopError(f"{path}: {video.dtype} pixels up to {video.max()}; integer pixels must be 0-255 "
                                 "(scale them, or save floats in 0-1)")
    if video.ndim == 4:
        if video.shape[-1] == 1:
            video = video[..., 0]
        else:  # luma of RGB(A), alpha ignored
            video = video[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    video = video.astype(np.float32, copy=False)
    if not np.isfinite(video).all():
        raise ReferenceLoopError(f"{path}: pixels hold NaN or infinity")
    if normalised and video.size and video.min() >= 0 and video.max() <= 1.0:
        video = video * 255.0
    return np.clip(video, 0, 255)


def _select_cycle(path: Path, video: np.ndarray, frames: str | None, cycle: Cycle,
                  fps: float | None) -> tuple[np.ndarray, str]:
    count = len(video)
    if frames is not None:
        start, stop = _parse_range(path, frames, count)
        return video[start:stop], f"frames={start}:{stop}"
    if isinstance(cycle, str):
        raise ReferenceLoopError(f"{path}: {cycle}; pick one with ?frames=A:B (from one end-diastole to the frame "
                                 "before the next)")
    if cycle is not None:
        start, stop = cycle
        return video[start:stop], f"the R-to-R cycle the file marks, frames {start}:{stop}"
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

