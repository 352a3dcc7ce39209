"""Our pretraining token file as a Megatron indexed dataset, for NeMo's ``PreTrainingDataModule``.

Megatron reads ``PREFIX.bin`` (the tokens, flat) and ``PREFIX.idx`` (dtype, one length and byte offset
per sequence, document boundaries). Our token file already is such a ``.bin``: the job links it into the
run directory (``RUN/nemo/data/tokens.bin``) and writes the ``.idx`` there with megatron-core's own
index writer, one sequence per document: from the token file's document offsets (``FILE.idx`` of
``launch data tokens``), else split after each ``eos_id`` of its sidecar, else one document. Nothing is
written next to the user's data and no token is copied.

Megatron's index has no uint32: a uint32 file (vocabularies over 65536 ids, DeepSeek-V3's 129280) is
declared int32, the same bytes for every id below 2**31.
"""

from __future__ import annotations

import os
from pathlib import Path

from launcher.errors import UserError


def megatron_prefix(run_dir: str) -> str:
    """The indexed dataset's path prefix NeMo is given (``data.paths``); made by :func:`index_token_file`."""
    return f"{run_dir}/nemo/data/tokens"


def document_lengths(token_file: str | Path):
    """Token counts of the file's documents (all > 0), as :func:`index_token_file` writes them."""
    import numpy as np

    from dataprep.token_file import open_tokens, read_document_offsets

    tokens, meta = open_tokens(token_file)
    offsets = read_document_offsets(token_file)
    if offsets is None:
        eos = meta.get("eos_id")
        ends = np.flatnonzero(np.asarray(tokens) == eos) + 1 if eos is not None else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], ends, [] if ends.size and ends[-1] == len(tokens) else [len(tokens)]]).astype(np.int64)
    elif len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(tokens) or (np.diff(offsets.astype(np.int64)) < 0).any():
        raise UserError(f"its document offsets ({token_file}.idx) do not cover its {len(tokens)} tokens in order; "
                        "write it again with launch data tokens", f"data.path {token_file}")
    lengths = np.diff(offsets.astype(np.int64))
    return lengths[lengths > 0], meta


def index_token_file(token_file: str | Path, prefix: str) -> int:
    """Link ``token_file`` as ``prefix.bin`` and write Megatron's ``prefix.idx``; returns the documents indexed."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import _IndexWriter

    token_file = Path(os.path.expanduser(str(token_file))).resolve()
    if not token_file.is_file():
        raise UserError(f"no such token file {token_file}", "data.path")
    lengths, meta = document_lengths(token_file)
    if not len(lengths):
        raise UserError(f"{token_file} holds no tokens", "data.path")
    if meta["dtype"] == "uint16":
        dtype = np.uint16
    else:
        if int(meta.get("vocab_size", 0)) > 2**31:
            raise UserError(f"ids up to {meta['vocab_size']} do not fit Megatron's int32 tokens", f"data.path {token_file}")
        dtype = np.int32
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    bin_path, idx_path = Path(prefix + ".bin"), Path(prefix + ".idx")
    for stale in (bin_path, idx_path):  # our own files from an earlier start of this job
        if stale.is_symlink() or stale.exists():
            stale.unlink()
    bin_path.symlink_to(token_file)
    with _IndexWriter(str(idx_path), dtype) as writer:
        writer.write(lengths, None, np.arange(len(lengths) + 1))
    return len(lengths)
