"""The SFT data format (NeMo's): a directory of ``training/validation/test.jsonl``, one JSON object per
line with string fields ``input`` and ``output`` (or ``prompt`` and ``completion``); other fields are
metadata carried along. Torch-free: the launcher checks the first records at pre-flight, the job reads
every record with the same rule, and both report a bad record as one line naming file and line.
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

from launcher.config_io import jsonl_records
from launcher.errors import UserError

SPLIT_FILES = {"training": "training.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}
SPLIT_ALIASES = {"train": "training", "val": "validation", "valid": "validation"}
FIELD_PAIRS = (("input", "output"), ("prompt", "completion"))
PREFLIGHT_RECORDS = 100  # records of each split checked before queueing
STATS_FILE = "stats.json"  # what ``launch data sft`` wrote the directory with
STATS_TOOL = "launch data sft"


def split_file(directory: str | Path, split: str) -> Path:
    """``<directory>/training.jsonl`` etc. (``train``/``val`` are accepted as split names too)."""
    split = SPLIT_ALIASES.get(split, split)
    if split not in SPLIT_FILES:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLIT_FILES)}", "split")
    return Path(directory) / SPLIT_FILES[split]


def record(obj: object, file: Path, lineno: int) -> tuple[str, str]:
    """(input, output) of one parsed line, or UserError naming file and line."""
    if not isinstance(obj, dict):
        raise UserError(f"line {lineno}: expected a JSON object, got {type(obj).__name__}", str(file))
    for a, b in FIELD_PAIRS:
        if a in obj and b in obj:
            if not (isinstance(obj[a], str) and isinstance(obj[b], str)):
                raise UserError(f"line {lineno}: fields {a!r} and {b!r} must be strings", str(file))
            return obj[a], obj[b]
    raise UserError(f"line {lineno}: needs string fields 'input' and 'output' (or 'prompt' and 'completion'); "
                    f"found {', '.join(map(repr, sorted(obj))) or 'none'}", str(file))


def read_records(file: str | Path, limit: int | None = None) -> list[tuple[str, str, dict]]:
    """(input, output, the whole row) of every record (the first ``limit`` with a limit); errors name file and line."""
    file = Path(file)
    if not file.is_file():
        raise UserError("no such file (an SFT directory holds training.jsonl, validation.jsonl, test.jsonl)", str(file))
    out = []
    try:
        with open(file, encoding="utf-8") as f:
            for lineno, obj in islice(jsonl_records(f, file), limit):
                out.append((*record(obj, file, lineno), obj))
    except UnicodeDecodeError:
        raise UserError("not UTF-8 text", str(file)) from None
    return out


def check_directory(directory: str | Path, need: tuple[str, ...] = ("training",)) -> list[tuple[str, str]]:
    """(field, message) problems of an SFT directory: missing splits in ``need``, a bad record among the
    first ones of each split present."""
    directory = Path(directory)
    if not directory.is_dir():
        return [("data.path", f"{directory} is not a directory (SFT data is a directory of training/validation/test.jsonl)")]
    problems = []
    for split, name in SPLIT_FILES.items():
        file = directory / name
        if not file.is_file():
            if split in need:
                problems.append(("data.path", f"{directory} has no {name}"))
            continue
        try:
            if not read_records(file, PREFLIGHT_RECORDS) and split in need:
                problems.append(("data.path", f"{file} has no records"))
        except UserError as exc:
            problems.append(("data.path", str(exc)))
    return problems


def prepared_template(directory: str | Path) -> str | None:
    """The data.template a directory written by ``launch data sft`` was prepared for (its stats.json), else None."""
    try:
        stats = json.loads((Path(directory) / STATS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(stats, dict) and stats.get("tool") == STATS_TOOL and isinstance(stats.get("template"), str):
        return stats["template"]
    return None
