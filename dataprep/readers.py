"""Raw records from JSONL, JSON, CSV/TSV, Parquet and Arrow files and from directories the ``datasets``
library saved (``save_to_disk``). Torch-free; pyarrow is imported only for Parquet and Arrow.

Every reader yields :class:`Row`: the record as a dict, where it came from (file and ``line N``,
``record N`` or ``row N``) and the split its source names, if any (a DatasetDict's split directory, a file
called ``train.jsonl`` or ``test-00000-of-00001.parquet``). Unreadable input raises UserError naming
the file and the line or row.
"""

from __future__ import annotations

import csv
import gzip
import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from launcher.config_io import jsonl_records
from launcher.errors import UserError

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "csv",
           ".parquet": "parquet", ".arrow": "arrow"}
VALID = "a .jsonl, .json, .csv, .tsv (each may be .gz), .parquet or .arrow file, or a directory saved by datasets' save_to_disk"
JSON_LIST_KEYS = ("data", "records", "rows", "examples", "instances")
ARROW_BATCH = 4096


@dataclass
class Row:
    data: dict
    file: str  # the file, or the datasets directory, it came from
    where: str  # "line 3" (JSONL, CSV), "record 3" (JSON), "row 3" (Parquet, Arrow); 1-based
    source_split: str | None = None  # a DatasetDict's split name, else the file's name (see split_of_name)


def source_format(path: Path) -> str:
    """jsonl | json | csv | parquet | arrow | datasets (a save_to_disk directory); UserError otherwise."""
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "datasets"
        raise UserError(f"a directory, but not one saved by datasets' save_to_disk (no state.json or dataset_dict.json); "
                        f"a source is {VALID}", str(path))
    if not path.is_file():
        raise UserError(f"no such file or directory (a source is {VALID})", str(path))
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes[-1:] == [".gz"]:
        suffixes = suffixes[:-1]
        if suffixes[-1:] and FORMATS.get(suffixes[-1]) in ("parquet", "arrow"):
            suffixes = []
    fmt = FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise UserError(f"unknown format (by its name); a source is {VALID}", str(path))
    return fmt


def read(path: str | Path) -> Iterator[Row]:
    """The records of one source, in order."""
    path = Path(path)
    fmt = source_format(path)
    if fmt == "datasets":
        yield from _read_datasets_dir(path)
        return
    reader = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet, "arrow": _read_arrow_file}[fmt]
    name = path.name.lower().removesuffix(".gz")
    for row in reader(path):
        row.source_split = name
        yield row


def _open_text(path: Path):
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8-sig", newline="")


@contextmanager
def _reading(path: Path):
    """Reading errors of a text file as UserError naming it."""
    try:
        yield
    except UnicodeDecodeError:
        raise UserError("not UTF-8 text", str(path)) from None
    except (OSError, EOFError) as e:  # a truncated or corrupt .gz, an unreadable file
        raise UserError(f"cannot read it ({e})", str(path)) from None


def _object(obj, path: Path, where: str) -> dict:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object (one record), got {type(obj).__name__}", str(path))
    return obj


def _read_jsonl(path: Path) -> Iterator[Row]:
    with _reading(path), _open_text(path) as f:
        for n, obj in jsonl_records(f, path):
            yield Row(_object(obj, path, f"line {n}"), str(path), f"line {n}")


def _read_json(path: Path) -> Iterator[Row]:
    """A list of records, or an object holding one (``{"data": [...]}``); a .json file that is really JSON
    Lines (one object per line, as many datasets ship it) is read as such."""
    with _reading(path), _open_text(path) as f:
        text = f.read()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            yield from _read_jsonl(path)
            return
        raise UserError(f"invalid JSON: {e.msg} (line {e.lineno}, column {e.colno})", str(path)) from None
    if isinstance(doc, dict):
        lists = {k: v for k, v in doc.items() if isinstance(v, list)}
        key = next((k for k in JSON_LIST_KEYS if k in lists), None) or (next(iter(lists)) if len(lists) == 1 else None)
        if key is None:
            raise UserError(f"expected a list of records, or an object with one list of them (e.g. {{\"data\": [...]}}); "
                            f"found keys {', '.join(map(repr, doc)) or 'none'}", str(path))
        doc = doc[key]
    if not isinstance(doc, list):
        raise UserError(f"expected a list of records, got {type(doc).__name__}", str(path))
    for n, obj in enumerate(doc, 1):
        yield Row(_object(obj, path, f"record {n}"), str(path), f"record {n}")


def _read_csv(path: Path) -> Iterator[Row]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    delimiter = "\t" if path.name.lower().removesuffix(".gz").endswith(".tsv") else ","
    with _reading(path), _open_text(path) as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
            if not header:
                raise UserError("line 1: no header row (the first line names the columns)", str(path))
            dupes = sorted({h for h in header if header.count(h) > 1})
            if dupes:
                raise UserError(f"line 1: column {dupes[0]!r} appears more than once in the header", str(path))
            previous = reader.line_num
            for values in reader:
                start, previous = previous + 1, reader.line_num
                if not values:
                    continue
                if len(values) != len(header):
                    raise UserError(f"line {start}: {len(values)} fields, the header has {len(header)}", str(path))
                yield Row(dict(zip(header, values)), str(path), f"line {start}")
        except csv.Error as e:
            raise UserError(f"line {reader.line_num}: not valid CSV: {e}", str(path)) from None


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UserError("reading Parquet and Arrow needs pyarrow: pip install pyarrow", "launch data sft") from None
    return pyarrow


def _rows_of_batches(batches, path: Path, start: int = 0, split: str | None = None) -> Iterator[Row]:
    n = start
    for batch in batches:
        for obj in batch.to_pylist():
            n += 1
            yield Row(obj, str(path), f"row {n}", split)


def _read_parquet(path: Path) -> Iterator[Row]:
    pa = _pyarrow()
    try:
        batches = pa.parquet.ParquetFile(str(path)).iter_batches(batch_size=ARROW_BATCH)
        yield from _rows_of_batches(batches, path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"not a readable Parquet file ({' '.join(str(e).split())})", str(path)) from None


def _arrow_batches(file: Path):
    """The record batches of an Arrow IPC file: the stream format (what datasets writes) or the file format."""
    pa = _pyarrow()
    try:
        with pa.memory_map(str(file)) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                source.seek(0)
                f = pa.ipc.open_file(source)
                reader = (f.get_batch(i) for i in range(f.num_record_batches))
            yield from reader
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"not a readable Arrow file ({' '.join(str(e).split())})", str(file)) from None


def _read_arrow_file(path: Path) -> Iterator[Row]:
    yield from _rows_of_batches(_arrow_batches(path), path)


def _read_json_file(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"not readable JSON ({e})", str(file)) from None
    if not isinstance(data, dict):
        raise UserError("expected a JSON object", str(file))
    return data


def _dataset_files(directory: Path) -> list[Path]:
    """The Arrow shards of one saved Dataset, in order (state.json's ``_data_files``)."""
    state = directory / "state.json"
    if state.is_file():
        entries = _read_json_file(state).get("_data_files")
        if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("filename"), str) for e in entries):
            raise UserError("_data_files: expected a list of {\"filename\": ...} (a datasets save_to_disk state)", str(state))
        files = [directory / e["filename"] for e in entries]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise UserError(f"lists {missing[0].name}, which is missing", str(state))
        return files
    files = sorted(directory.glob("*.arrow"))
    if not files:
        raise UserError("no state.json and no .arrow files: not a directory saved by datasets' save_to_disk", str(directory))
    return files


def _read_dataset(directory: Path, split: str | None) -> Iterator[Row]:
    n = 0
    for file in _dataset_files(directory):
        for row in _rows_of_batches(_arrow_batches(file), directory, n, split):
            n += 1
            yield row


def _read_datasets_dir(path: Path) -> Iterator[Row]:
    """A saved Dataset (its rows) or DatasetDict (every split's rows, in dataset_dict.json's order)."""
    listing = path / "dataset_dict.json"
    if not listing.is_file():
        yield from _read_dataset(path, path.name.lower())
        return
    splits = _read_json_file(listing).get("splits")
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
        raise UserError("splits: expected a list of split names", str(listing))
    for split in splits:
        if not (path / split).is_dir():
            raise UserError(f"lists split {split!r}, but {path / split} is not a directory", str(listing))
        yield from _read_dataset(path / split, split)
