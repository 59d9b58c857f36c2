"""A patient's echo loop read from the files clinicians have: video, DICOM cine, NumPy."""
from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import pytest

from echopulse.core.reference_loop import ReferenceLoopError, load_reference_loop, split_spec


def cycle(frames: int = 12, size: int = 64, seed: int = 0) -> np.ndarray:
    """A gray loop with structure: a bright disc whose radius changes frame by frame."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    radius = size * (0.2 + 0.1 * np.sin(np.linspace(0, 2 * np.pi, frames, endpoint=False)))
    video = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2 < radius[:, None, None] ** 2) * 180.0
    return np.clip(video + rng.normal(0, 5, video.shape) + 30, 0, 255).astype(np.uint8)


# NumPy

def test_a_uint8_loop_of_the_model_size_comes_back_unchanged(tmp_path):
    video = cycle()
    np.save(tmp_path / "loop.npy", video)
    loop = load_reference_loop(tmp_path / "loop.npy", 64)
    np.testing.assert_array_equal(loop.frames, video)
    assert loop.cycle == "whole file" and loop.fps is None


def test_colour_becomes_luma_and_normalised_floats_are_scaled(tmp_path):
    video = cycle()
    np.save(tmp_path / "rgb.npy", np.repeat(video[..., None], 3, axis=-1))
    np.testing.assert_array_equal(load_reference_loop(tmp_path / "rgb.npy", 64).frames, video)
    np.save(tmp_path / "float.npy", video.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(load_reference_loop(tmp_path / "float.npy", 64).frames, video)
    rgb = np.zeros((3, 8, 8, 3), np.uint8)
    rgb[..., 0] = 255  # pure red: luma 0.299
    np.save(tmp_path / "red.npy", rgb)
    assert load_reference_loop(tmp_path / "red.npy", 8).frames[0, 0, 0] == round(0.299 * 255)


def test_the_simulators_npz_gives_its_first_whole_r_to_r_cycle(tmp_path):
    from echopulse.core.simulate.paired import simulate_pair

    sample = simulate_pair(seed=3, size=64, frames=60, fps=30.0)
    np.savez(tmp_path / "sim.npz", **{k: sample[k] for k in ("video", "video_t", "r_peaks")})
    loop = load_reference_loop(tmp_path / "sim.npz", 64)
    t, r = sample["video_t"], sample["r_peaks"]
    r0 = r[r >= t[0]][0]  # the first R the video shows, and the next one
    r1 = r[r > r0][0]
    assert r1 <= t[-1] + 1 / 30  # this clip covers the whole cycle
    np.testing.assert_array_equal(loop.frames, sample["video"][(t >= r0 - 1e-9) & (t < r1 - 1e-9)])
    assert loop.fps == pytest.approx(30.0) and "R-to-R" in loop.cycle
    assert abs(len(loop.frames) - (r1 - r0) * 30) <= 1


def test_frames_option_picks_the_cycle(tmp_path):
    video = cycle(30)
    np.save(tmp_path / "long.npy", video)
    loop = load_reference_loop(f"{tmp_path / 'long.npy'}?frames=5:17", 64)
    np.testing.assert_array_equal(loop.frames, video[5:17])
    assert loop.cycle == "frames=5:17"


@pytest.mark.parametrize("query, words", [
    ("frames=9:3", "outside the file's 30 frames"),
    ("frames=0:31", "outside the file's 30 frames"),
    ("frames=4:5", "fewer than 2 frames"),
    ("frames=a:b", "frames must be A:B"),
    ("frames=7", "frames must be A:B"),
    ("crop=1,2,3", "crop must be X,Y,W,H"),
    ("crop=0,0,65,10", "leaves the 64x64 frame"),
    ("fit=stretch", "fit must be crop or pad"),
    ("speed=2", "unknown option 'speed'"),
])
def test_bad_options_are_one_line_errors(tmp_path, query, words):
    np.save(tmp_path / "long.npy", cycle(30))
    with pytest.raises(ReferenceLoopError, match=words):
        load_reference_loop(f"{tmp_path / 'long.npy'}?{query}", 64)


def test_crop_and_fit_shape_a_wide_frame(tmp_path):
    video = np.full((4, 40, 80), 200, np.uint8)
    video[:, :, :20] = 0  # a dark left quarter
    np.save(tmp_path / "wide.npy", video)
    cropped = load_reference_loop(tmp_path / "wide.npy", 40).frames  # central 40x40: columns 20..59, all bright
    assert cropped.shape == (4, 40, 40) and cropped.min() == 200
    padded = load_reference_loop(f"{tmp_path / 'wide.npy'}?fit=pad", 80).frames  # black bars above and below
    assert padded.shape == (4, 80, 80)
    assert padded[:, :20].max() == 0 and padded[:, 60:].max() == 0 and padded[:, 20:60, 20:].min() == 200
    boxed = load_reference_loop(f"{tmp_path / 'wide.npy'}?crop=0,0,20,20", 20).frames
    assert boxed.max() == 0  # the box lies in the dark quarter


def test_resizing_keeps_levels_and_halves(tmp_path):
    video = np.zeros((3, 128, 128), np.uint8)
    video[:, :, :64] = 240
    np.save(tmp_path / "big.npy", video)
    small = load_reference_loop(tmp_path / "big.npy", 64).frames
    assert small.shape == (3, 64, 64)
    assert small[:, :, :31].min() == 240 and small[:, :, 33:].max() == 0


@pytest.mark.parametrize("make, words", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_bytes(b"not numpy"), "not a readable NumPy file"),
    (lambda p: np.save(p, cycle()[:1]), "at least 2 frames"),
    (lambda p: np.save(p, np.full((3, 8, 8), np.nan, np.float32)), "NaN or infinity"),
    (lambda p: np.save(p, np.zeros((3, 8), np.uint8)), "expected frames"),
    (lambda p: np.save(p, np.zeros((3, 8, 8), bool)), "pixels must be numbers"),
])
def test_unusable_numpy_files_are_one_line_errors(tmp_path, make, words):
    path = tmp_path / "bad.npy"
    make(path)
    with pytest.raises(ReferenceLoopError, match=words):
        load_reference_loop(path, 64)


def test_an_npz_without_a_video_names_its_arrays(tmp_path):
    np.savez(tmp_path / "two.npz", a=np.zeros(3), b=np.zeros(3))
    with pytest.raises(ReferenceLoopError, match="needs a 'video' array .has a, b"):
        load_reference_loop(tmp_path / "two.npz", 64)


def test_unknown_format_and_empty_spec(tmp_path):
    (tmp_path / "loop.txt").write_text("1 2 3")
    with pytest.raises(ReferenceLoopError, match="unknown reference loop format '.txt'"):
        load_reference_loop(tmp_path / "loop.txt", 64)
    with pytest.raises(ReferenceLoopError, match="no file named"):
        split_spec("?frames=1:3")


def test_a_long_whole_file_warns_that_it_may_hold_several_beats(tmp_path, caplog):
    import imageio.v2 as imageio

    video = cycle(75)
    imageio.mimsave(tmp_path / "long.mp4", list(video), fps=25, macro_block_size=1)
    with caplog.at_level(logging.WARNING):
        loop = load_reference_loop(tmp_path / "long.mp4", 64)
    assert len(loop.frames) == 75 and "3.0 s of video taken as one cardiac cycle" in caplog.text


# video files

@pytest.mark.parametrize("suffix", [".mp4", ".avi", ".gif"])
def test_video_files_read_back_close_to_what_was_written(tmp_path, suffix):
    import imageio.v2 as imageio

    video = cycle(20)
    path = tmp_path / f"loop{suffix}"
    if suffix == ".gif":
        imageio.mimsave(path, list(video), duration=40)
    else:
        imageio.mimsave(path, list(np.repeat(video[..., None], 3, axis=-1)), fps=25, macro_block_size=1, quality=9)
    loop = load_reference_loop(path, 64)
    assert loop.frames.shape == video.shape
    lossy = 0 if suffix == ".gif" else 6
    assert np.abs(loop.frames.astype(int) - video).mean() <= lossy  # codecs round, they do not move the heart
    if suffix != ".gif":
        assert loop.fps == pytest.approx(25.0)


def test_a_damaged_video_is_a_one_line_error(tmp_path):
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    with pytest.raises(ReferenceLoopError, match="broken.mp4: cannot"):
        load_reference_loop(path, 64)


# DICOM

def write_dicom(path, video: np.ndarray, photometric: str = "MONOCHROME2", jpeg: bool = False, **tags) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.Rows, ds.Columns = video.shape[1:3]
    ds.NumberOfFrames = len(video)
    ds.SamplesPerPixel = 3 if video.ndim == 4 else 1
    ds.PhotometricInterpretation = photometric
    if video.ndim == 4:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for key, value in tags.items():
        setattr(ds, key, value)
    if jpeg:
        from PIL import Image

        encoded = []
        for frame in video:
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="JPEG", quality=95)
            encoded.append(buf.getvalue())
        ds.PixelData = encapsulate(encoded)
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = video.tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_a_dicom_cine_loop_uses_its_r_wave_pointer_and_frame_time(tmp_path):
    video = cycle(30)
    write_dicom(tmp_path / "echo.dcm", video, FrameTime=33.33, RWavePointer=[4, 19, 29])
    loop = load_reference_loop(tmp_path / "echo.dcm", 64)
    np.testing.assert_array_equal(loop.frames, video[3:18])  # frame numbers count from 1
    assert loop.fps == pytest.approx(30.0, rel=1e-3) and "frames 3:18" in loop.cycle
    # ?frames= wins over the file's marks
    np.testing.assert_array_equal(load_reference_loop(f"{tmp_path / 'echo.dcm'}?frames=0:10", 64).frames, video[:10])


def test_a_jpeg_compressed_colour_dicom_reads_as_gray(tmp_path):
    video = cycle(6)
    write_dicom(tmp_path / "jpeg.dcm", np.repeat(video[..., None], 3, axis=-1), photometric="YBR_FULL_422", jpeg=True,
                CineRate=50)
    loop = load_reference_loop(tmp_path / "jpeg.dcm", 64)
    assert loop.frames.shape == video.shape and loop.fps == 50.0
    assert np.abs(loop.frames.astype(int) - video).mean() < 4


@pytest.mark.parametrize("tags, frames", [
    ({"HeartRate": 120}, (4, 19)),                        # 0.5 s at 30 fps from the mark (frame 5, from 1)
    ({"NominalInterval": 400, "HeartRate": 120}, (4, 16)),  # the nominal R-R interval (ms) first
    ({"HeartRate": 500}, (4, 30)),                        # no plausible rate: from the mark to the end, warned
    ({}, (4, 30)),
])
def test_a_dicom_with_one_r_mark_takes_one_beat_from_it(tmp_path, caplog, tags, frames):
    """Cine loops often mark a single R: the frames before it are not the cycle's start."""
    video = cycle(30)
    write_dicom(tmp_path / "one.dcm", video, FrameTime=33.33, RWavePointer=[5], **tags)
    with caplog.at_level(logging.WARNING):
        loop = load_reference_loop(tmp_path / "one.dcm", 64)
    np.testing.assert_array_equal(loop.frames, video[slice(*frames)])
    assert ("no R-R interval" in caplog.text) == (frames[1] == 30)


def test_a_single_r_mark_near_the_end_takes_the_beat_before_it(tmp_path, caplog):
    video = cycle(30)
    write_dicom(tmp_path / "late.dcm", video, FrameTime=33.33, RWavePointer=[26], HeartRate=120)
    np.testing.assert_array_equal(load_reference_loop(tmp_path / "late.dcm", 64).frames, video[10:25])
    write_dicom(tmp_path / "last.dcm", cycle(8), RWavePointer=[8])  # no rate, no frames after it
    with caplog.at_level(logging.WARNING):
        assert len(load_reference_loop(tmp_path / "last.dcm", 64).frames) == 8
    assert "marks only the last frame; the whole file" in caplog.text


def test_a_dicom_without_pixels_is_a_one_line_error(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.3.1", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.Modality = meta, "US"
    ds.save_as(tmp_path / "empty.dcm", enforce_file_format=True)
    with pytest.raises(ReferenceLoopError, match="empty.dcm: cannot read DICOM pixel data"):
        load_reference_loop(tmp_path / "empty.dcm", 64)


# found in review: DICOM levels and colour

def test_a_monochrome1_dicom_is_inverted_so_the_blood_pool_stays_dark(tmp_path):
    video = cycle(8)  # MONOCHROME1 stores the lowest value as white
    write_dicom(tmp_path / "m1.dcm", 255 - video, photometric="MONOCHROME1")
    np.testing.assert_array_equal(load_reference_loop(tmp_path / "m1.dcm", 64).frames, video)


def test_a_palette_colour_dicom_reads_through_its_palette(tmp_path):
    from pydicom import dcmread

    video = cycle(8)
    write_dicom(tmp_path / "pal.dcm", video)
    ds = dcmread(tmp_path / "pal.dcm")
    ds.PhotometricInterpretation = "PALETTE COLOR"
    lut = (np.arange(256, dtype=np.uint16)[::-1] * 257).tobytes()  # index i shows gray 255 - i, 16-bit entries
    for colour in ("Red", "Green", "Blue"):
        ds.add_new(f"{colour}PaletteColorLookupTableDescriptor", "US", [256, 0, 16])
        ds.add_new(f"{colour}PaletteColorLookupTableData", "OW", lut)
    ds.save_as(tmp_path / "pal.dcm")
    np.testing.assert_array_equal(load_reference_loop(tmp_path / "pal.dcm", 64).frames, 255 - video)


def write_dicom16(path, stored: np.ndarray, bits: int, signed: bool, **tags) -> None:
    """A 16-bit-allocated DICOM with `bits` stored, unsigned or two's complement."""
    from pydicom import dcmread

    write_dicom(path, np.zeros(stored.shape, np.uint8), **tags)
    ds = dcmread(path)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, int(signed)
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    ds.save_as(path)


def test_16_bit_dicoms_keep_their_levels_signed_or_not(tmp_path):
    video = cycle(6)
    write_dicom16(tmp_path / "u12.dcm", video.astype(np.uint16) * 16, bits=12, signed=False)
    assert np.abs(load_reference_loop(tmp_path / "u12.dcm", 64).frames.astype(int) - video).max() <= 1
    # two's complement: -2048 is black, 2047 white (was all black: negative levels clipped)
    write_dicom16(tmp_path / "s12.dcm", video.astype(np.int16) * 16 - 2048, bits=12, signed=True)
    assert np.abs(load_reference_loop(tmp_path / "s12.dcm", 64).frames.astype(int) - video).max() <= 1


def test_a_dicom_without_number_of_frames_reads_its_frames(tmp_path):
    from pydicom import dcmread

    video = cycle(12)
    for name, frames in (("many.dcm", video), ("single.dcm", video[:1])):
        write_dicom(tmp_path / name, frames)
        ds = dcmread(tmp_path / name)
        del ds.NumberOfFrames  # optional for some SOP classes; pydicom then counts the frames itself
        ds.save_as(tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom says it counted them
        np.testing.assert_array_equal(load_reference_loop(tmp_path / "many.dcm", 64).frames, video)
        with pytest.raises(ReferenceLoopError, match="at least 2 frames"):
            load_reference_loop(tmp_path / "single.dcm", 64)


def test_a_malformed_or_negative_frame_time_means_no_frame_rate(tmp_path):
    write_dicom(tmp_path / "bad.dcm", cycle(8), FrameTime="33.3")
    data = (tmp_path / "bad.dcm").read_bytes()
    (tmp_path / "bad.dcm").write_bytes(data.replace(b"33.3", b"abcd"))  # not a decimal string
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom's note on the invalid value
        assert load_reference_loop(tmp_path / "bad.dcm", 64).fps is None
    write_dicom(tmp_path / "neg.dcm", cycle(8), FrameTime="-33")
    assert load_reference_loop(tmp_path / "neg.dcm", 64).fps is None


# found in review: cycle selection

def test_adjacent_r_wave_marks_do_not_make_a_one_frame_cycle(tmp_path):
    """Marks at frames 3 and 4 once gave a 1-frame loop that the generator refused at the
    first beat (a traceback per beat in serve, a crashed replay): the first R-to-R pair of
    at least 2 frames is the cycle."""
    from echopulse.stream.backends import ReferenceLoops

    video = cycle(12)
    write_dicom(tmp_path / "adj.dcm", video, RWavePointer=[3, 4, 10])
    loop = load_reference_loop(tmp_path / "adj.dcm", 64)
    np.testing.assert_array_equal(loop.frames, video[3:9])
    assert len(ReferenceLoops({"dev": str(tmp_path / "adj.dcm")}, 64).frames("dev")) >= 2


def test_an_npz_whose_r_peaks_leave_no_whole_cycle_is_an_error(tmp_path):
    """The simulator's clip starts a quarter beat before R: 20 frames at 30 fps hold no whole
    R-to-R cycle, and the whole file (which does not start at R) was taken as one."""
    from echopulse.core.simulate.paired import simulate_pair

    sample = simulate_pair(seed=3, size=64, frames=20, fps=30.0)
    np.savez(tmp_path / "short.npz", **{k: sample[k] for k in ("video", "video_t", "r_peaks")})
    with pytest.raises(ReferenceLoopError, match="short.npz: .*no whole R-to-R cycle.*frames=A:B"):
        load_reference_loop(tmp_path / "short.npz", 64)
    assert len(load_reference_loop(f"{tmp_path / 'short.npz'}?frames=10:20", 64).frames) == 10  # the way out


# found in review: levels, geometry, frame rate, memory

def test_integer_pixels_above_255_are_refused_not_saturated(tmp_path):
    np.save(tmp_path / "u16.npy", cycle(6).astype(np.uint16) * 256)  # was read back all white
    with pytest.raises(ReferenceLoopError, match="u16.npy: .*0-255"):
        load_reference_loop(tmp_path / "u16.npy", 64)


@pytest.mark.parametrize("shape", [(3, 0, 64), (3, 64, 0)])
def test_empty_frames_are_a_one_line_error(tmp_path, shape):
    np.save(tmp_path / "flat.npy", np.zeros(shape, np.uint8))  # was a RuntimeError from torch
    for spec in (tmp_path / "flat.npy", f"{tmp_path / 'flat.npy'}?fit=pad"):
        with pytest.raises(ReferenceLoopError, match="flat.npy: empty frames"):
            load_reference_loop(spec, 64)


def test_a_gif_with_a_long_last_frame_keeps_its_frame_rate(tmp_path, caplog):
    from PIL import Image

    video = cycle(20)
    images = [Image.fromarray(frame) for frame in video]
    # 40 ms frames and a 2-s pause before the loop repeats: Pillow's info holds the last frame's
    images[0].save(tmp_path / "pause.gif", save_all=True, append_images=images[1:], duration=[40] * 19 + [2000])
    with caplog.at_level(logging.WARNING):
        loop = load_reference_loop(tmp_path / "pause.gif", 64)
    assert loop.fps == pytest.approx(25.0) and "taken as one cardiac cycle" not in caplog.text


def test_picking_a_few_frames_of_a_long_file_does_not_convert_all_of_it(tmp_path):
    """?frames= of a long recording: only the cycle becomes float (it took 6x the file)."""
    import tracemalloc

    np.save(tmp_path / "long.npy", np.random.default_rng(0).integers(0, 256, (300, 128, 128, 3), np.uint8))
    size = (tmp_path / "long.npy").stat().st_size
    tracemalloc.start()
    try:
        loop = load_reference_loop(f"{tmp_path / 'long.npy'}?frames=0:10", 64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert loop.frames.shape == (10, 64, 64) and peak < 1.5 * size, peak / size


def test_a_video_of_more_pixels_than_the_budget_is_refused(tmp_path, monkeypatch):
    import imageio.v2 as imageio

    from echopulse.core import reference_loop

    imageio.mimsave(tmp_path / "long.mp4", list(cycle(20)), fps=25, macro_block_size=1)
    monkeypatch.setattr(reference_loop, "MAX_VIDEO_BYTES", 10 * 64 * 64)  # ten frames' worth
    with pytest.raises(ReferenceLoopError, match="MiB of pixels; cut one cardiac cycle out first"):
        load_reference_loop(tmp_path / "long.mp4", 64)
