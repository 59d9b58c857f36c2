"""ECG from text files: plain tables, Apple Health ECG exports, OpenSignals (BITalino).

Plain tables (CSV/TXT/TSV): columns separated by comma, semicolon, tab or spaces
(detected from the numeric rows; with `;`, tab or spaces, or inside quotes, a decimal
comma is accepted; an unquoted "0,5" in a comma file reads as two columns), optional
header line (and under it, optionally, a units row, as in PhysioBank ATM's `samples.csv`:
'Elapsed time','MLII' / 'hh:mm:ss.mmm','mV'; each column is then read in its own unit, and
columns in mmHg, NU, % or bpm are left out with a warning) and comment lines starting
with `#`. Each data column is a lead. A cell that is empty, `-`, `NA` or `NaN` is a
missing sample (NaN, which the engine marks invalid); wall-clock date-times read as
missing too, so a column of them (Polar Sensor Logger's "Phone timestamp") is dropped, as is
any column with no number at all. A row that breaks the columns of numbers is an error
naming its line, unless it is the last (a line cut short: left out with a warning).
A column labelled like a time (`t`, `time`, `timestamp`, `seconds`, `sensor timestamp [ns]`,
`time (ms)`...; values in seconds or `m:ss.mmm`) gives fs = samples per second over its span
(in the unit its label or units cell says); an unlabelled first column
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
import math
import re
from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .recording import ReplayError, Recording, default_names, resolve_fs, to_mv

log = logging.getLogger(__name__)

BITALINO_VCC = 3.3
BITALINO_ECG_GAIN = 1100.0
DELIMITERS = (",", ";", "\t", None)  # None: runs of whitespace
TIME_LABEL = re.compile(r"^\s*((sensor|device|phone|system|host)\s+)?(t|time|times|timestamp|seconds|secs?|elapsed[\w ]*)\s*"
                        r"([\(\[]\s*(?P<unit>s|sec|ms|us|µs|ns)\s*[\)\]]|_(?P<unit_>s|ms|us|ns))?\s*$", re.I)
TIME_UNITS = {"s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
# a cell of a units row (the line under the labels): a voltage, a time unit, or another
# physical unit (clinical records' pressures and plethysmograms), optionally in brackets
UNIT_CELL = re.compile(r"^[\(\[]?\s*(?:(?P<volt>[mµμu]?V)|(?P<time>(?i:s|secs?|seconds?|ms|us|µs|ns|(?:hh:)?mm:ss(?:\.m+)?))"
                       r"|(?P<other>(?i:mmhg|kpa|nu|%|bpm)))?\s*[\)\]]?$")
MISSING = {"", "-", "--", "na", "n/a", "nan", "null", "none"}  # a cell without a sample
DATE_TIME = re.compile(r"^\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d([.,]\d+)?)?\s*(Z|[+-]\d\d:?\d\d)?$")
CLOCK = re.compile(r"^(?:(\d+):)?(\d+):(\d\d(?:\.\d+)?)$")
INDEX_LABEL = re.compile(r"^\s*(nseq|index|idx|samples?(\s*(#|no\.?|nr\.?|num|number)|_?(index|idx|num))?|n|#)\s*$", re.I)
HZ = re.compile(r"(\d+(?:[.,]\d+)?)\s*(?:hz|hertz)\b", re.I)
UNIT_SMALL = re.compile(r"(?<![A-Za-z])(µV|μV|uV|mV)(?![A-Za-z0-9])")
UNIT_VOLT = re.compile(r"(?<![A-Za-z])V(?![A-Za-z0-9])")
LEAD_VALUE = re.compile(r"^(?:[A-Za-zÀ-ÿ]+\s+)?(I{1,3}|aV[RLF]|V[1-6])$")


def read_text(path: Path, fs: float | None, unit: str | None, lead: str | int | None = None) -> Recording:
    text = _read(path)
    first = next(_lines(text), "")
    if first.lstrip().startswith("#") and "opensignals" in first.lower():
        return _read_opensignals(path.name, text.splitlines(), fs, lead)
    return _read_table(path.name, text, fs, unit)


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


def _lines(text: str) -> Iterator[str]:
    """The lines of `text` one at a time: a list of them all takes several times the file's size."""
    newline = "\n" if "\n" in text else "\r"  # "\r" alone: classic Mac line ends
    start = 0
    while start < len(text):
        end = text.find(newline, start)
        end = len(text) if end < 0 else end
        yield text[start:end].rstrip("\r")
        start = end + 1


def _last_lines(text: str, count: int) -> list[str]:
    """The last `count` data lines (not blank, not `#`), from the end of `text` only."""
    size = 1 << 16
    while True:
        chunk = text[-size:]
        lines = chunk.splitlines()[1 if size < len(text) else 0 :]  # the first may be a part of a line
        lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if len(lines) >= count or size >= len(text):
            return lines[-count:]
        size *= 4


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
    try:
        return float(field)  # the common case first: a long file has millions of fields
    except ValueError:
        pass
    if field.lower() in MISSING or DATE_TIME.match(field):
        return math.nan  # a gap (rdsamp writes "-"), or a wall-clock stamp: no sample, no sample clock
    if decimal_comma or "," in field:  # a comma left inside a field can only be a decimal one
        field = field.replace(",", ".")
    clock = CLOCK.match(field)
    if clock:  # elapsed time as PhysioBank ATM writes it: 'm:ss.mmm' or 'h:mm:ss.mmm'
        return int(clock.group(1) or 0) * 3600 + int(clock.group(2)) * 60 + float(clock.group(3))
    try:
        return float(field.replace("−", "-"))  # U+2212, as some locales write minus
    except ValueError:
        return None


def _numeric_row(line: str, delim: str | None) -> list[float] | None:
    """The row's numbers (NaN where a cell holds none); None if a cell holds text."""
    fields = _fields(line, delim)
    decimal_comma = delim != ","
    values = [_number(f, decimal_comma) for f in fields]
    if not fields or any(v is None for v in values):
        return None
    return values  # type: ignore[return-value]


def _blank(row: list[float]) -> bool:
    return all(math.isnan(v) for v in row)  # ",,," as a spreadsheet saves an empty line


def _choose_delimiter(lines: list[str]) -> tuple[str | None, int]:
    """The delimiter that reads the most columns, consistently, from the last rows, and
    that number of columns; without the very last row if it does not fit (cut short)."""
    for probe in (lines, lines[:-1]):
        best, best_cols = ",", 0
        for delim in DELIMITERS:
            rows = [r for r in (_numeric_row(ln, delim) for ln in probe) if r is None or not _blank(r)]
            widths = {len(r) for r in rows if r is not None}
            if rows and all(r is not None for r in rows[-10:]) and len(widths) == 1:
                cols = widths.pop()
                if cols > best_cols:
                    best, best_cols = delim, cols
        if best_cols:
            return best, best_cols
    raise ReplayError("no numeric samples found")


def _scan(name: str, text: str, delim: str | None, width: int) -> tuple[list[str], np.ndarray]:
    """The preamble (the data lines before the body) and the body, (n, width): the rows of
    `width` numbers. A row that breaks the body is an error when rows follow it (reading on
    would lose or shift samples), and left out with a warning when it is the last."""
    preamble: list[str] = []
    values = array("d")  # flat: a list of floats per row takes ten times the memory
    broken: tuple[int, str] | None = None
    for number, line in enumerate(_lines(text), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        row = _numeric_row(line, delim)
        if row is not None and _blank(row):
            continue
        if row is not None and len(row) == width:
            if broken is not None:
                raise ReplayError(f"{name}: line {broken[0]}: {broken[1][:60]!r} is not {width} numbers, "
                                  "though rows before and after it are; a missing value can be left empty or written NaN")
            values.extend(row)
        elif values:
            broken = broken or (number, line.strip())
        else:
            preamble.append(line)
    if broken is not None:
        log.warning("%s: line %d: %r left out, not %d numbers (a last line cut short?)", name, broken[0], broken[1][:60], width)
    if not values:
        raise ReplayError(f"{name}: no numeric samples found")
    return preamble, np.frombuffer(values, dtype=np.float64).reshape(-1, width)


def _header(preamble: list[str], delim: str | None, width: int) -> tuple[list[str], list[str]]:
    """Column labels and units from the last preamble lines: a label row, optionally
    followed by a units row (PhysioBank ATM: 'Elapsed time','MLII' / 'hh:mm:ss.mmm','mV')."""
    last = _fields(preamble[-1], delim) if preamble else []
    if len(last) != width:
        return [], []
    cells = [UNIT_CELL.match(f) for f in last]
    if len(preamble) > 1 and all(cells) and any(m.group("volt") for m in cells if m):
        above = _fields(preamble[-2], delim)
        if len(above) == width:
            return above, last
    return last, []


def _read_table(name: str, text: str, fs: float | None, unit: str | None) -> Recording:
    try:
        delim, width = _choose_delimiter(_last_lines(text, 50))
    except ReplayError as exc:
        raise ReplayError(f"{name}: {exc}") from None
    preamble, body = _scan(name, text, delim, width)
    data = body.T  # (columns, n)
    labels, units = _header(preamble, delim, width)
    meta_text = "\n".join(preamble[: len(preamble) - bool(labels) - bool(units)])

    # time and index columns; all-empty ones (a spreadsheet's trailing delimiter, wall-clock stamps)
    time_fs = None
    keep = [c for c in range(width) if not np.isnan(data[c]).all()]
    for c in list(keep):
        label = labels[c] if labels else ""
        m = TIME_LABEL.match(label)
        if m or (not labels and c == 0 and width > 1 and _steady_step(data[0], below=1.0)):
            time_fs = _fs_from_time(data[c] * _time_scale(m, units[c] if units else ""), name)
            keep.remove(c)
        elif INDEX_LABEL.match(label) or (not labels and c == 0 and width > 1 and _is_index(data[0])):
            keep.remove(c)
    if not keep:
        raise ReplayError(f"{name}: no signal column besides time/index")
    names = [labels[c] for c in keep] if labels else default_names(len(keep))

    hz = HZ.search(meta_text)
    found_fs = time_fs if time_fs is not None else (float(hz.group(1).replace(",", ".")) if hz else None)
    lead_name = _lead_name(preamble)
    if lead_name and len(keep) == 1 and not labels:
        names = [lead_name]
    fs_final = resolve_fs(fs, found_fs, name)
    # all labels, not only the kept columns': Apple's "Unit,µV" is read as labels once Excel pads the rows to two cells
    fallback = unit or _unit_from(meta_text) or _unit_from(" ".join(labels or names)) or "mV"
    if units and unit is None:
        keep, names, column_units = _volt_columns(name, keep, names, [units[c] for c in keep], fallback)
    else:
        column_units = [fallback] * len(keep)
    samples = np.empty((len(keep), data.shape[1]), np.float32)  # column by column: no float64 copy of them all
    for row, (c, column_unit) in enumerate(zip(keep, column_units)):
        samples[row] = to_mv(data[c], column_unit, name)
    return Recording(samples, fs_final, names)


def _volt_columns(name: str, keep: list[int], names: list[str], cells: list[str], fallback: str) -> tuple[list[int], list[str], list[str]]:
    """The columns whose units-row cell is a voltage, each in its own unit (a blank cell: `fallback`);
    the others (a pressure in mmHg, a plethysmogram in NU) left out and named in a warning, as for WFDB."""
    kept: list[int] = []
    kept_names: list[str] = []
    kept_units: list[str] = []
    others: list[str] = []
    for c, label, cell in zip(keep, names, cells):
        m = UNIT_CELL.match(cell)
        if m and m.group("other"):
            others.append(f"{label} ({cell})")
        else:
            kept.append(c)
            kept_names.append(label)
            kept_units.append(_unit_from(cell) or fallback)
    if not kept:
        raise ReplayError(f"{name}: no column in volts, so no ECG: {', '.join(others)}")
    if others:
        log.warning("%s: leaving out the columns not in volts: %s", name, ", ".join(others))
    return kept, kept_names, kept_units


def _time_scale(label: re.Match[str] | None, unit_cell: str) -> float:
    """Seconds per unit of a time column: from its label ("timestamp [ns]"), else its units-row cell."""
    unit = (label.group("unit") or label.group("unit_") or "") if label else ""
    if not unit:
        cell = UNIT_CELL.match(unit_cell)
        unit = (cell.group("time") or "") if cell else ""
    return TIME_UNITS.get(unit.lower(), 1.0)  # "hh:mm:ss.mmm" cells are read as seconds already


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
