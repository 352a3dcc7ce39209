"""The pretraining token file, torch-free: written by ``launch data tokens``, read by trainer.data.TokenFileDataset.

``FILE``         the token ids, flat, native byte order (little-endian on every supported machine), uint16 or uint32;
``FILE.json``    the sidecar: ``{"dtype": "uint16"|"uint32"}`` (absent: uint16), and from ``launch data tokens`` also
                 ``tokens``, ``documents``, ``eos_id``, ``vocab_size``, ``tokenizer``, ``index``;
``FILE.idx``     optional document offsets: ``documents + 1`` uint64 values, document ``i`` is
                 ``tokens[idx[i]:idx[i + 1]]`` (its text's ids followed by the end-of-sequence id).

Documents are also separated in the flat stream itself: every document ends with ``eos_id``, so a reader
that ignores the index (the trainer cuts the stream into rows) still sees the boundaries.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

DTYPES = ("uint16", "uint32")
INDEX_DTYPE = "uint64"


def dtype_for_vocab(vocab_size: int) -> str:
    """uint16 when every id of a ``vocab_size`` vocabulary fits (<= 65536 ids), else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def token_dtype(name: str):
    """The numpy dtype of a sidecar's ``dtype`` name; ValueError for anything but uint16/uint32."""
    import numpy as np

    if name not in DTYPES:
        raise ValueError(f"token file dtype must be uint16 or uint32, got {name!r}")
    return np.dtype(name)


def sidecar_path(path: str | Path) -> Path:
    return Path(str(path) + ".json")


def index_path(path: str | Path) -> Path:
    return Path(str(path) + ".idx")


def read_sidecar(path: str | Path) -> dict:
    """The sidecar of token file ``path`` (``{"dtype": "uint16"}`` when there is none)."""
    file = sidecar_path(path)
    if not file.is_file():
        return {"dtype": "uint16"}
    try:
        meta = json.loads(file.read_text())
    except ValueError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return {"dtype": "uint16", **meta}


def sidecar_text(meta: dict) -> str:
    return json.dumps(meta, indent=2) + "\n"


def write_token_file(path: str | Path, tokens: Sequence[int], dtype: str = "uint16") -> Path:
    """Write a flat token file and its ``<path>.json`` sidecar ``{"dtype": ...}`` (small files, tests)."""
    import numpy as np

    path = Path(path)
    arr = np.asarray(tokens, dtype=np.int64)
    limit = np.iinfo(token_dtype(dtype)).max
    if arr.size and (arr.min() < 0 or arr.max() > limit):
        raise ValueError(f"token ids out of range for {dtype}")
    arr.astype(token_dtype(dtype)).tofile(path)
    sidecar_path(path).write_text(json.dumps({"dtype": dtype}) + "\n")
    return path


def open_tokens(path: str | Path):
    """(read-only memmap of all tokens, sidecar) of token file ``path``; checks the size against the sidecar."""
    import numpy as np

    path = Path(path)
    meta = read_sidecar(path)
    dtype = token_dtype(meta["dtype"])
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise ValueError(f"{path}: {size} bytes is not a whole number of {meta['dtype']} tokens; wrong dtype in the sidecar?")
    n_tokens = size // dtype.itemsize
    if "tokens" in meta and meta["tokens"] != n_tokens:
        raise ValueError(f"{path}: holds {n_tokens} tokens but its sidecar says {meta['tokens']}; the file was changed or cut short")
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens else np.zeros(0, dtype)
    return tokens, meta


def read_document_offsets(path: str | Path):
    """The ``documents + 1`` document offsets of token file ``path`` (its ``.idx``), or None when it has none."""
    import numpy as np

    file = index_path(path)
    if not file.is_file():
        return None
    return np.fromfile(file, dtype=INDEX_DTYPE)
