"""Read a whole ECG recording from a file: (samples leads×n float32 mV, fs, lead names).

Formats, chosen by suffix (text files are also sniffed):
- `.npy`: a 1-D array, or 2-D leads×n (or n×leads when the first axis is the longer);
  fs only from `fs=`. Unit mV unless `unit=`.
- `.npz`: the samples under one of the keys `ecg, signal, samples, data, x` (or the only
  array); fs from `fs, sampling_rate, sample_rate, frequency` if present; lead names
  from `leads` or `lead_names`; unit from `unit`.
- `.hea` / `.dat` / a record name with a `.hea` beside it: WFDB via `wfdb.rdrecord`
  (physical units from the header, converted to mV).
- anything else (`.csv`, `.txt`, `.tsv`...): text, see `textfiles.py` (plain tables,
  Apple Health ECG export, OpenSignals/BITalino).

`fs=` and `lead=` (a name or an index) stand in where the file cannot say; an explicit
`fs` wins over what the file says (a warning is logged if they disagree). Any failure is
a `ReplayError` with a one-line message.
"""
from __future__ import annotations

import logging
import math
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .chunk import UNIT_TO_MV

log = logging.getLogger(__name__)

MAX_LEADS = 12
NPZ_SAMPLE_KEYS = ("ecg", "signal", "samples", "data", "x")
NPZ_FS_KEYS = ("fs", "sampling_rate", "sample_rate", "frequency")


class ReplayError(Exception):
    """A recording that cannot be read; the message is one line, fit for the CLI."""


class Recording(NamedTuple):
    samples: np.ndarray  # float32 mV, (leads, n)
    fs: float
    leads: list[str]


def read_recording(path: str | Path, fs: float | None = None, lead: str | int | None = None, unit: str | None = None) -> Recording:
    """Read `path`; see the module docstring for formats and options."""
    path = Path(path)
    if fs is not None and not (math.isfinite(fs) and fs > 0):
        raise ReplayError(f"--fs must be a positive number, got {fs}")
    if unit is not None and unit not in UNIT_TO_MV:
        raise ReplayError(f"unknown unit {unit!r}; known: {', '.join(UNIT_TO_MV)}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            rec = _read_npy(path, fs, unit)
        elif suffix == ".npz":
            rec = _read_npz(path, fs, unit)
        elif suffix in (".hea", ".dat") or (not path.exists() and path.with_name(path.name + ".hea").exists()):
            return _read_wfdb(path, fs, lead)  # picks the lead itself, before unit conversion
        else:
            from .textfiles import read_text  # local: text parsing is the biggest reader

            rec = read_text(path, fs, unit, lead)
    except ReplayError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # BadZipFile: a cut-off .npz
        raise ReplayError(f"{path.name}: cannot read: {_one_line(exc)}") from None
    return select_lead(rec, lead, path.name)


def select_lead(rec: Recording, lead: str | int | None, where: str = "") -> Recording:
    """Keep one lead, chosen by name (case-insensitive) or index; None keeps all."""
    if rec.samples.shape[0] > MAX_LEADS and lead is None:
        raise ReplayError(f"{where}: {rec.samples.shape[0]} channels; pick one with --lead ({_names(rec.leads)})")
    if lead is None:
        return rec
    i = lead_index(rec.leads, lead, where)
    return Recording(rec.samples[i : i + 1], rec.fs, [rec.leads[i]])


def lead_index(leads: list[str], lead: str | int, where: str = "") -> int:
    """The index of `lead` (a name, case-insensitive, or an index) among `leads`."""
    if isinstance(lead, str) and not lead.lstrip("-").isdigit():
        matches = [i for i, name in enumerate(leads) if name.lower() == lead.lower()]
        if not matches:
            raise ReplayError(f"{where}: no lead {lead!r}; leads: {_names(leads)}")
        return matches[0]
    i = int(lead)
    if not 0 <= i < len(leads):
        raise ReplayError(f"{where}: lead index {i} out of range 0..{len(leads) - 1}")
    return i


def resolve_fs(given: float | None, found: float | None, where: str) -> float:
    """The explicit fs if given (warning when the file disagrees), else the file's."""
    if given is not None:
        if found is not None and not math.isclose(given, found, rel_tol=0.01):
            log.warning("%s: file says fs %g Hz, using --fs %g Hz", where, found, given)
        return float(given)
    if found is None or not (math.isfinite(found) and found > 0):
        raise ReplayError(f"{where}: sample rate unknown; pass --fs")
    return float(found)


def as_leads_first(arr: np.ndarray, where: str) -> np.ndarray:
    """(n,) → (1, n); (a, b) → leads first, taking the shorter axis as leads."""
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.size == 0:
        raise ReplayError(f"{where}: samples of shape {arr.shape}; want (n,) or (leads, n)")
    if arr.shape[0] > arr.shape[1]:
        arr = arr.T
    if not np.issubdtype(arr.dtype, np.number):
        raise ReplayError(f"{where}: samples of dtype {arr.dtype}, not numbers")
    return arr


def to_mv(arr: np.ndarray, unit: str, where: str) -> np.ndarray:
    if unit not in UNIT_TO_MV:
        raise ReplayError(f"{where}: unknown unit {unit!r}; known: {', '.join(UNIT_TO_MV)}")
    return np.ascontiguousarray(arr * UNIT_TO_MV[unit], dtype=np.float32)


def default_names(count: int) -> list[str]:
    return [f"ch{i}" for i in range(count)]


def _read_npy(path: Path, fs: float | None, unit: str | None) -> Recording:
    arr = as_leads_first(np.load(path, allow_pickle=False), path.name)
    return Recording(to_mv(arr, unit or "mV", path.name), resolve_fs(fs, None, path.name), default_names(arr.shape[0]))


def _read_npz(path: Path, fs: float | None, unit: str | None) -> Recording:
    with path.open("rb") as f, np.load(f, allow_pickle=False) as z:  # our handle: np.load leaks its own on a cut-off file
        keys = list(z.keys())
        key = next((k for k in NPZ_SAMPLE_KEYS if k in keys), None)
        if key is None:
            arrays = [k for k in keys if z[k].ndim >= 1 and z[k].size > 1 and np.issubdtype(z[k].dtype, np.number)]
            if len(arrays) != 1:
                raise ReplayError(f"{path.name}: which array is the ECG? keys: {', '.join(keys)}; name it one of {', '.join(NPZ_SAMPLE_KEYS)}")
            key = arrays[0]
        arr = as_leads_first(z[key], path.name)
        found_fs = next((float(np.asarray(z[k]).ravel()[0]) for k in NPZ_FS_KEYS if k in keys and z[k].size), None)
        names = next(([str(s) for s in z[k].ravel()] for k in ("leads", "lead_names") if k in keys), None)
        file_unit = str(z["unit"]) if "unit" in keys else None
    if names is None or len(names) != arr.shape[0]:
        names = default_names(arr.shape[0])
    return Recording(to_mv(arr, unit or file_unit or "mV", path.name), resolve_fs(fs, found_fs, path.name), names)


def _read_wfdb(path: Path, fs: float | None, lead: str | int | None) -> Recording:
    """A WFDB record's ECG channels in mV. Clinical records mix in other signals (ABP in
    mmHg, PLETH and RESP in NU): with `lead` only that channel is read; without, only the
    channels in volts, and the others are named in a warning."""
    import wfdb  # local: wfdb pulls in pandas, slow to import for other formats

    name = path.with_suffix("") if path.suffix.lower() in (".hea", ".dat") else path
    try:
        record = wfdb.rdrecord(str(name))
    except Exception as exc:  # wfdb fails on a damaged header with whatever it hit (IndexError, TypeError...)
        raise ReplayError(f"{path.name}: cannot read: {_one_line(exc)}") from None
    if record.p_signal is None:
        raise ReplayError(f"{path.name}: WFDB record has no physical signal")
    arr = record.p_signal.T  # (leads, n), physical units per channel
    names = [str(s) if s else f"ch{i}" for i, s in enumerate(record.sig_name or [None] * arr.shape[0])]  # a header may name none
    units = [_VOLTS.get(str(u).lower(), str(u)) for u in (record.units or ["mV"] * arr.shape[0])]
    if lead is not None:
        keep = [lead_index(names, lead, path.name)]
    else:
        keep = [i for i, u in enumerate(units) if u in UNIT_TO_MV]
        others = [f"{names[i]} ({units[i]})" for i in range(len(names)) if i not in keep]
        if not keep:
            raise ReplayError(f"{path.name}: no channel in volts, so no ECG: {_names(others)}")
        if others:
            log.warning("%s: leaving out the channels not in volts: %s", path.name, _names(others))
    out = np.stack([to_mv(arr[i], units[i], f"{path.name}, channel {names[i]}") for i in keep])
    rec = Recording(out, resolve_fs(fs, record.fs, path.name), [names[i] for i in keep])
    return select_lead(rec, None, path.name)  # the lead count check


_VOLTS = {"uv": "uV", "µv": "µV", "mv": "mV", "v": "V"}  # WFDB headers write units in any case


def _names(names: list[str]) -> str:
    return ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
