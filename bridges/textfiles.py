"""ECG from text files: plain tables, Apple Health ECG exports, OpenSignals (BITalino).

Plain tables (CSV/TXT/TSV): columns separated by comma, semicolon, tab or spaces
(detected from the numeric rows; with `;`, tab or spaces, or inside quotes, a decimal
comma is accepted; an unquoted "0,5" in a comma file reads as two columns), optional
header line and comment lines starting with `#`. Each data column is a lead.
A column labelled like a time (`t`, `time`, `timestamp`, `seconds`, `time (ms)`...) gives
fs = samples per second over its span (seconds, or ms when the label says ms); an unlabelled first column
that rises in equal steps under 1 is taken as time in seconds, one rising by exactly 1
as a sample index; index columns (`nSeq`, `index`, `sample`) are dropped.

Metadata preambles (Apple Health ECG export and similar): lines before the numeric body
that are not one header row. The sample rate is the first number followed by `Hz` or
`hertz` anywhere in them (so header words in any language work: "Sample Rate,512
hertz", "Abtastrate,512 Hertz"); the unit is µV/uV/mV/V as written there (Apple: µV); a
line whose value reads like a lead ("Lead I", "Ableitung I", "II", "aVF", "V2") names it.

OpenSignals text (first line `# OpenSignals Text File Format`, a `#` line holding a JSON
header): the ECG is the analog channel whose "sensor" is ECG (or the one `--lead` names,
e.g. A2); raw ADC values are converted with the BITalino ECG transfer function

    ECG(V) = (ADC / 2^n − 0.5) · VCC / G_ECG,   VCC = 3.3 V, G_ECG = 1100,

n = the channel's resolution from the header (10 bits on A1–A4), returned in mV.

Without a unit anywhere, text samples are taken as mV; pass `unit=` otherwise.
"""
from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import numpy as np

from .recording import ReplayError, Recording, default_names, resolve_fs, to_mv

log = logging.getLogger(__name__)

BITALINO_VCC = 3.3
BITALINO_ECG_GAIN = 1100.0
DELIMITERS = (",", ";", "\t", None)  # None: runs of whitespace
TIME_LABEL = re.compile(r"^\s*(t|time|times|timestamp|seconds|secs?|elapsed[\w ]*)\s*([\(\[]\s*(s|sec|ms)\s*[\)\]]|_(s|ms))?\s*$", re.I)
INDEX_LABEL = re.compile(r"^\s*(nseq|index|idx|samples?(\s*(#|no\.?|nr\.?|num|number)|_?(index|idx|num))?|n|#)\s*$", re.I)
HZ = re.compile(r"(\d+(?:[.,]\d+)?)\s*(?:hz|hertz)\b", re.I)
UNIT_SMALL = re.compile(r"(?<![A-Za-z])(µV|μV|uV|mV)(?![A-Za-z0-9])")
UNIT_VOLT = re.compile(r"(?<![A-Za-z])V(?![A-Za-z0-9])")
LEAD_VALUE = re.compile(r"^(?:[A-Za-zÀ-ÿ]+\s+)?(I{1,3}|aV[RLF]|V[1-6])$")


def read_text(path: Path, fs: float | None, unit: str | None, lead: str | int | None = None) -> Recording:
    text = _read(path)
    lines = text.splitlines()
    if lines and lines[0].lstrip().startswith("#") and "opensignals" in lines[0].lower():
        return _read_opensignals(path.name, lines, fs, lead)
    return _read_table(path.name, lines, fs, unit)


def _read(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:4096] and not data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ReplayError(f"{path.name}: binary data, not a text table (for WFDB .dat, open the .hea)")
    for encoding in ("utf-8-sig", "utf-16", "latin-1"):
        if encoding == "utf-16" and not data.startswith((b"\xff\xfe", b"\xfe\xff")):
            continue
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise ReplayError(f"{path.name}: not a text file")  # unreachable: latin-1 decodes anything


# -- plain tables and metadata preambles -------------------------------------------------


def _fields(line: str, delim: str | None) -> list[str]:
    if delim is None:
        parts = line.split()
    elif '"' in line:  # quoted fields may hold the delimiter ("-40,5" in a comma file)
        parts = next(csv.reader([line], delimiter=delim))
    else:
        parts = line.split(delim)
    return [f.strip().strip("\"'") for f in parts]  # PhysioBank's CSV exports quote labels as 'MLII'


def _number(field: str, decimal_comma: bool) -> float | None:
    if decimal_comma or "," in field:  # a comma left inside a field can only be a decimal one
        field = field.replace(",", ".")
    try:
        return float(field.replace("−", "-"))  # U+2212, as some locales write minus
    except ValueError:
        return None


def _numeric_row(line: str, delim: str | None) -> list[float] | None:
    fields = _fields(line, delim)
    decimal_comma = delim != ","
    values = [_number(f, decimal_comma) for f in fields]
    if not fields or any(v is None for v in values):
        return None
    return values  # type: ignore[return-value]


def _choose_delimiter(lines: list[str]) -> str | None:
    """The delimiter that reads the most columns, consistently, from the last rows."""
    probe = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")][-50:]
    best, best_cols = ",", 0
    for delim in DELIMITERS:
        rows = [_numeric_row(ln, delim) for ln in probe]
        widths = {len(r) for r in rows if r is not None}
        if rows and all(r is not None for r in rows[-10:]) and len(widths) == 1:
            cols = widths.pop()
            if cols > best_cols:
                best, best_cols = delim, cols
    if best_cols == 0:
        raise ReplayError("no numeric samples found")
    return best


def _read_table(name: str, lines: list[str], fs: float | None, unit: str | None) -> Recording:
    try:
        delim = _choose_delimiter(lines)
    except ReplayError as exc:
        raise ReplayError(f"{name}: {exc}") from None
    # the body: the trailing run of numeric rows of one width (blank and # lines skipped)
    rows: list[list[float]] = []
    start = len(lines)
    width = None
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i]
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        row = _numeric_row(line, delim)
        if row is None or (width is not None and len(row) != width):
            break
        width = len(row)
        rows.append(row)
        start = i
    rows.reverse()
    preamble = [ln for ln in lines[:start] if ln.strip() and not ln.lstrip().startswith("#")]
    data = np.asarray(rows, dtype=np.float64).T  # (columns, n)
    labels = _fields(preamble[-1], delim) if preamble else []
    if len(labels) != data.shape[0]:
        labels = []
    meta_text = "\n".join(preamble if not labels else preamble[:-1])

    # time and index columns
    time_fs = None
    keep = list(range(data.shape[0]))
    for c in range(data.shape[0]):
        label = labels[c] if labels else ""
        m = TIME_LABEL.match(label)
        if m or (not labels and c == 0 and data.shape[0] > 1 and _steady_step(data[0], below=1.0)):
            scale = 1e-3 if m and "ms" in {(m.group(3) or "").lower(), (m.group(4) or "").lower()} else 1.0
            time_fs = _fs_from_time(data[c] * scale, name)
            keep.remove(c)
        elif INDEX_LABEL.match(label) or (not labels and c == 0 and data.shape[0] > 1 and _is_index(data[0])):
            keep.remove(c)
    if not keep:
        raise ReplayError(f"{name}: no signal column besides time/index")
    names = [labels[c] for c in keep] if labels else default_names(len(keep))

    hz = HZ.search(meta_text)
    found_fs = time_fs if time_fs is not None else (float(hz.group(1).replace(",", ".")) if hz else None)
    if unit is None:
        unit = _unit_from(meta_text) or _unit_from(" ".join(names)) or "mV"
    lead_name = _lead_name(preamble)
    if lead_name and len(keep) == 1 and not labels:
        names = [lead_name]
    fs_final = resolve_fs(fs, found_fs, name)
    return Recording(to_mv(data[keep], unit, name), fs_final, names)


def _steady_step(col: np.ndarray, below: float) -> bool:
    step = np.diff(col)
    if step.size < 2 or not (step > 0).all():
        return False
    med = float(np.median(step))
    return med < below and float(np.abs(step - med).max()) <= 0.05 * med


def _is_index(col: np.ndarray) -> bool:
    step = np.diff(col)
    return step.size >= 2 and bool((step == 1).all())


def _fs_from_time(t: np.ndarray, name: str) -> float:
    step = np.diff(t)
    if step.size == 0 or not (step > 0).all():
        raise ReplayError(f"{name}: time column does not increase; pass --fs")
    # the mean step over the whole span: rounded timestamps (1/360 s written as 0.0028
    # or 0.0027) average out; the median would not
    fs = (t.size - 1) / float(t[-1] - t[0])
    if float(np.abs(step * fs - 1).max()) > 0.6:
        log.warning("%s: irregular time steps (gaps?); fs from the mean step: %.3f Hz", name, fs)
    return float(round(fs)) if abs(fs - round(fs)) <= 0.002 * fs else fs


def _unit_from(text: str) -> str | None:
    m = UNIT_SMALL.search(text)
    if m:
        return {"μV": "µV"}.get(m.group(1), m.group(1))
    return "V" if UNIT_VOLT.search(text) else None


def _lead_name(preamble: list[str]) -> str | None:
    for line in preamble:
        value = re.split(r"[,;\t]", line, maxsplit=1)[-1].strip().strip('"')
        if LEAD_VALUE.match(value):
            return value
    return None


# -- OpenSignals (BITalino) ------------------------------------------------------------------


def _read_opensignals(name: str, lines: list[str], fs: float | None, lead: str | int | None) -> Recording:
    header = None
    for line in lines:
        if not line.lstrip().startswith("#"):
            break
        body = line.lstrip()[1:].strip()
        if body.startswith("{"):
            try:
                header = json.loads(body)
            except json.JSONDecodeError as exc:
                raise ReplayError(f"{name}: bad OpenSignals JSON header: {exc}") from None
    if not isinstance(header, dict) or not header:
        raise ReplayError(f"{name}: OpenSignals file without a JSON header line")
    dev = next(iter(header.values()))
    if not isinstance(dev, dict) or "column" not in dev:
        raise ReplayError(f"{name}: OpenSignals header lacks 'column'")
    columns: list[str] = list(dev["column"])
    labels: list[str] = list(dev.get("label", [c for c in columns if c.startswith("A")]))
    sensors: list[str] = list(dev.get("sensor", [""] * len(labels)))
    resolution: list[int] = list(dev.get("resolution", [10] * len(labels)))
    if isinstance(lead, str) and lead in labels:
        chosen = [labels.index(lead)]  # the user knows which channel the ECG is on
    else:
        chosen = _opensignals_channels(name, labels, sensors)
    rows = [r for r in (_numeric_row(ln, None) for ln in lines if ln.strip() and not ln.lstrip().startswith("#")) if r]
    data = np.asarray([r for r in rows if len(r) == len(columns)], dtype=np.float64)
    if data.size == 0:
        raise ReplayError(f"{name}: no samples with {len(columns)} columns")
    out = []
    for i in chosen:
        column = columns.index(labels[i])
        adc = data[:, column]
        # OpenSignals writes one resolution per column ([4, 1, 1, 1, 1, 10] for nSeq, the
        # four digital lines and A2); a shorter list is read as one per label.
        per_column = len(resolution) == len(columns)
        bits = int(resolution[column] if per_column else resolution[i] if i < len(resolution) else 10)
        volts = (adc / 2**bits - 0.5) * BITALINO_VCC / BITALINO_ECG_GAIN
        out.append(volts)
    samples = to_mv(np.asarray(out), "V", name)
    return Recording(samples, resolve_fs(fs, dev.get("sampling rate"), name), [labels[i] for i in chosen])


def _opensignals_channels(name: str, labels: list[str], sensors: list[str]) -> list[int]:
    ecg = [i for i, s in enumerate(sensors) if str(s).upper().startswith("ECG")]
    if ecg:
        return ecg
    if len(labels) == 1:
        return [0]
    # --lead (applied afterwards) picks among all analog channels
    log.warning("%s: no channel marked ECG; reading all analog channels %s", name, labels)
    return list(range(len(labels)))
