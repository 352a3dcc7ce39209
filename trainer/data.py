"""Training data: SFT JSONL (NeMo's format) with chat templates and packing, tokenized pretraining files,
and a deterministic, resumable, data-parallel batch loader.

Every dataset is a sequence of *rows*: dicts of 1-D LongTensors ``input_ids``, ``labels``, ``position_ids``,
``segment_ids`` of exactly ``seq_length`` positions. Labels are aligned with positions (``labels[i]`` is
the token that follows ``input_ids[i]`` in the same sample; ``IGNORE_INDEX`` = no loss). A sample of ``L``
tokens occupies ``L - 1`` positions (inputs ``t[:-1]``, labels ``t[1:]``), so a sample of up to
``seq_length + 1`` tokens fits a row, and no label ever crosses a sample boundary.

The loader walks one endless stream of global rows: epoch ``e`` is a permutation of all rows drawn from
``torch.Generator().manual_seed(seed + e)``; step ``k`` takes the next ``global_batch_size`` rows of the
stream, data-parallel rank ``r`` its contiguous ``1/dp_size`` slice, cut into micro batches. The position
is kept in global rows, so a run resumes exactly, with the same or a different data-parallel size.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from dataprep.token_file import open_tokens, write_token_file  # noqa: F401 (write_token_file: re-exported)
from launcher.sft_format import read_records, split_file  # noqa: F401 (split_file: re-exported for the job side)
from model.transformer import IGNORE_INDEX
from trainer.chat import render_chat

BATCH_KEYS = ("input_ids", "labels", "position_ids", "segment_ids")


# ------------------------------------------------------------------------------------------------ SFT JSONL

def read_sft_records(file: str | Path) -> list[tuple[str, str, dict]]:
    """(input, output, the whole row) of every line of a JSONL file; the row carries any metadata fields.
    A malformed line raises UserError naming file and line (launcher.sft_format)."""
    return read_records(file)


def read_sft_jsonl(file: str | Path) -> list[tuple[str, str]]:
    """(input, output) string pairs of a JSONL file; a malformed line raises ValueError naming file and line."""
    return [(i, o) for i, o, _ in read_sft_records(file)]


def load_sft_split(directory: str | Path, split: str, tok, template: str = "chatml") -> list[tuple[list[int], list[int]]]:
    """The templated (prompt_ids, answer_ids) of every sample of one split of a NeMo-format SFT directory."""
    return [render_chat(template, p, a, tok) for p, a in read_sft_jsonl(split_file(directory, split))]


# --------------------------------------------------------------------------------------------- SFT rows

def sample_to_positions(prompt_ids: Sequence[int], answer_ids: Sequence[int], seq_length: int,
                        answer_only_loss: bool) -> tuple[list[int], list[int], int]:
    """(inputs, labels, dropped tokens) of one sample, truncated to ``seq_length + 1`` tokens (keeping the start).

    ``labels[i]`` is the token after ``inputs[i]``; it is IGNORE_INDEX when that token belongs to the prompt
    and ``answer_only_loss`` is set.
    """
    tokens = list(prompt_ids) + list(answer_ids)
    keep = seq_length + 1
    dropped = max(0, len(tokens) - keep)
    tokens = tokens[:keep]
    n_prompt = len(prompt_ids) if answer_only_loss else 0
    labels = [t if j + 1 >= n_prompt else IGNORE_INDEX for j, t in enumerate(tokens[1:])]
    return tokens[:-1], labels, dropped


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack items into bins of ``capacity`` in order, each into the first bin with room (O(n log n))."""
    n = len(lengths)
    size = 1
    while size < max(n, 1):
        size *= 2
    tree = [capacity] * (2 * size)  # max remaining room below each node; leaves = bins
    bins: list[list[int]] = []
    for idx, length in enumerate(lengths):
        if length > capacity:
            raise ValueError(f"item {idx} of length {length} exceeds the bin capacity {capacity}")
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= length else 2 * node + 1
        leaf = node - size
        tree[node] -= length
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
        if leaf == len(bins):
            bins.append([])
        bins[leaf].append(idx)
    return bins


class SFTDataset:
    """Templated SFT samples laid out in rows of ``seq_length`` positions, packed or one sample per row.

    Packed rows hold whole samples (first fit, in file order); ``segment_ids`` number the samples of a row
    0, 1, 2, ... and the trailing padding gets the next id; ``position_ids`` restart at 0 in each segment.
    Padding is ``pad_id`` with IGNORE_INDEX labels.
    """

    def __init__(self, samples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_length: int, pad_id: int,
                 answer_only_loss: bool = True, packing: bool = True):
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        self.seq_length, self.pad_id, self.packing = seq_length, pad_id, packing
        self.inputs: list[list[int]] = []
        self.labels: list[list[int]] = []
        self.truncated = self.dropped_tokens = self.skipped = self.label_tokens = 0
        for prompt_ids, answer_ids in samples:
            inputs, labels, dropped = sample_to_positions(prompt_ids, answer_ids, seq_length, answer_only_loss)
            if not inputs:  # a one-token sample has nothing to predict
                self.skipped += 1
                continue
            self.truncated += dropped > 0
            self.dropped_tokens += dropped
            self.label_tokens += sum(label != IGNORE_INDEX for label in labels)
            self.inputs.append(inputs)
            self.labels.append(labels)
        if not self.inputs:
            raise ValueError("the SFT dataset has no usable samples")
        lengths = [len(x) for x in self.inputs]
        self.rows = first_fit(lengths, seq_length) if packing else [[i] for i in range(len(lengths))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        inputs, labels, positions, segments = [], [], [], []
        for seg, i in enumerate(self.rows[index]):
            n = len(self.inputs[i])
            inputs += self.inputs[i]
            labels += self.labels[i]
            positions += range(n)
            segments += [seg] * n
        pad = self.seq_length - len(inputs)
        if pad:
            inputs += [self.pad_id] * pad
            labels += [IGNORE_INDEX] * pad
            positions += range(pad)
            segments += [len(self.rows[index])] * pad
        return {k: torch.tensor(v, dtype=torch.long) for k, v in zip(BATCH_KEYS, (inputs, labels, positions, segments))}

    def stats(self) -> dict[str, int]:
        return {"samples": len(self.inputs), "rows": len(self.rows), "truncated": self.truncated,
                "dropped_tokens": self.dropped_tokens, "label_tokens": self.label_tokens, "skipped": self.skipped}


# ------------------------------------------------------------------------------------------ pretraining

class TokenFileDataset:
    """A flat memory-mapped token file (dataprep.token_file: ``launch data tokens`` writes them) cut into rows of
    ``seq_length + 1`` tokens: inputs ``row[:-1]``, labels ``row[1:]``. The dtype comes from the sidecar
    ``<path>.json`` (``{"dtype": "uint32"}``), default uint16; documents end with the tokenizer's eos id."""

    def __init__(self, path: str | Path, seq_length: int):
        self.path, self.seq_length = Path(path), seq_length
        if not self.path.is_file():
            raise FileNotFoundError(f"pretraining token file not found: {self.path}")
        self.tokens, self.meta = open_tokens(self.path)
        self.dtype = self.tokens.dtype
        n_tokens = len(self.tokens)
        self.n_rows = n_tokens // (seq_length + 1)
        if self.n_rows == 0:
            raise ValueError(f"{self.path}: {n_tokens} tokens is less than one row of seq_length + 1 = {seq_length + 1}")
        self.dropped_tokens = n_tokens - self.n_rows * (seq_length + 1)

    def __len__(self) -> int:
        return self.n_rows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        import numpy as np

        if not 0 <= index < self.n_rows:
            raise IndexError(index)
        start = index * (self.seq_length + 1)
        row = torch.from_numpy(np.asarray(self.tokens[start:start + self.seq_length + 1], dtype=np.int64))
        return {"input_ids": row[:-1].clone(), "labels": row[1:].clone(),
                "position_ids": torch.arange(self.seq_length), "segment_ids": torch.zeros(self.seq_length, dtype=torch.long)}

    def stats(self) -> dict[str, int]:
        return {"samples": self.n_rows, "rows": self.n_rows, "truncated": 0, "dropped_tokens": self.dropped_tokens,
                "label_tokens": self.n_rows * self.seq_length, "skipped": 0}


# ------------------------------------------------------------------------------------------------ loader

def tokens_in_batch(batch: dict[str, torch.Tensor]) -> int:
    """Labelled tokens (labels != IGNORE_INDEX) in a batch."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


def default_cache_dir() -> Path:
    """Where the generated smoke dataset is cached: ``$MOE_LAUNCH_DATA_CACHE`` or ``~/.cache/moe-launch/data``."""
    env = os.environ.get("MOE_LAUNCH_DATA_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moe-launch" / "data"


def sft_directory(data_cfg, cache_dir: str | Path | None = None) -> Path:
    """The directory holding an SFT recipe's training/validation/test.jsonl (``path=None``: the smoke data)."""
    if data_cfg.path is None:
        from trainer.smoke_data import ensure_smoke_dataset

        return ensure_smoke_dataset(cache_dir if cache_dir is not None else default_cache_dir())
    return Path(data_cfg.path).expanduser()


def build_dataset(data_cfg, tokenizer, split: str = "training", cache_dir: str | Path | None = None):
    """The rows of one split for a recipe's ``Data`` section (``path=None``: the generated smoke SFT data)."""
    if data_cfg.kind == "pretrain":
        if data_cfg.path is None:
            raise ValueError("data.path must name a tokenized token file for kind='pretrain'")
        return TokenFileDataset(data_cfg.path, data_cfg.seq_length)
    if data_cfg.kind != "sft":
        raise ValueError(f"unknown data.kind {data_cfg.kind!r} (expected 'sft' or 'pretrain')")
    samples = load_sft_split(sft_directory(data_cfg, cache_dir), split, tokenizer, data_cfg.template)
    pad_id = next((i for i in (tokenizer.pad_id, tokenizer.eos_id) if i is not None), 0)
    return SFTDataset(samples, data_cfg.seq_length, pad_id, data_cfg.answer_only_loss, data_cfg.packing)


@dataclass
class DataLoaderState:
    """The loader's position: global rows consumed by completed steps, and micro batches taken of the current step."""

    consumed_rows: int = 0
    micro: int = 0


class TrainLoader:
    """Deterministic, resumable micro batches of one data-parallel rank (see the module docstring)."""

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int, seed: int, dp_rank: int = 0, dp_size: int = 1):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"invalid data-parallel rank {dp_rank} of {dp_size}")
        if micro_batch_size < 1 or global_batch_size % (dp_size * micro_batch_size):
            raise ValueError(f"global_batch_size {global_batch_size} must be a multiple of "
                             f"dp_size {dp_size} x micro_batch_size {micro_batch_size}")
        if len(dataset) == 0:
            raise ValueError("the dataset has no rows")
        self.dataset, self.seed = dataset, seed
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.state = DataLoaderState()
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch_size // (self.dp_size * self.micro_batch_size)

    @property
    def n_rows(self) -> int:
        return len(self.dataset)

    @property
    def epoch(self) -> int:
        return self.state.consumed_rows // self.n_rows

    def permutation(self, epoch: int) -> torch.Tensor:
        """The row order of one epoch."""
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = torch.randperm(self.n_rows, generator=torch.Generator().manual_seed(self.seed + epoch))
        return self._perms[epoch]

    def global_row(self, g: int) -> int:
        """The dataset row at position ``g`` of the global row stream."""
        epoch, pos = divmod(g, self.n_rows)
        return int(self.permutation(epoch)[pos])

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's next micro batch: LongTensors [micro_batch_size, seq_length]."""
        per_rank = self.global_batch_size // self.dp_size
        start = self.state.consumed_rows + self.dp_rank * per_rank + self.state.micro * self.micro_batch_size
        rows = [self.dataset[self.global_row(start + k)] for k in range(self.micro_batch_size)]
        self.state.micro += 1
        if self.state.micro == self.micro_batches_per_step:
            self.state = DataLoaderState(self.state.consumed_rows + self.global_batch_size, 0)
        return {k: torch.stack([r[k] for r in rows]) for k in BATCH_KEYS}

    def step_batches(self) -> list[dict[str, torch.Tensor]]:
        """All micro batches of this rank for one optimizer step."""
        return [self.next_batch() for _ in range(self.micro_batches_per_step)]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    tokens_in_batch = staticmethod(tokens_in_batch)

    def state_dict(self) -> dict:
        """The position, in global rows (independent of dp size), plus what must match on resume."""
        epoch, row_in_epoch = divmod(self.state.consumed_rows, self.n_rows)
        return {**asdict(self.state), "epoch": epoch, "row_in_epoch": row_in_epoch, "n_rows": self.n_rows,
                "seed": self.seed, "dp_size": self.dp_size, "micro_batch_size": self.micro_batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` left off; the dp size may differ if it was saved between steps."""
        if state["n_rows"] != self.n_rows:
            raise ValueError(f"data loader state is for {state['n_rows']} rows but the dataset has {self.n_rows}; "
                             "the data, tokenizer or sequence settings changed since the checkpoint")
        if state["seed"] != self.seed:
            raise ValueError(f"data loader state was saved with seed {state['seed']}, this run uses {self.seed}")
        micro = state.get("micro", 0)
        if micro and (state["dp_size"], state["micro_batch_size"]) != (self.dp_size, self.micro_batch_size):
            raise ValueError("data loader state was saved in the middle of a step; it can only resume with the same "
                             "dp size and micro batch size")
        self.state = DataLoaderState(int(state["consumed_rows"]), int(micro))

    def stats(self) -> dict[str, int]:
        """samples, rows, truncated, dropped_tokens, label_tokens (and skipped) of the dataset."""
        return self.dataset.stats()


def build_train_loader(data_cfg, train_cfg, tokenizer, dp_rank: int = 0, dp_size: int = 1, *,
                       split: str = "training", cache_dir: str | Path | None = None) -> TrainLoader:
    """The training loader of this data-parallel rank for a recipe's ``Data`` and ``Train`` sections."""
    dataset = build_dataset(data_cfg, tokenizer, split, cache_dir)
    return TrainLoader(dataset, train_cfg.global_batch_size, train_cfg.micro_batch_size, train_cfg.seed, dp_rank, dp_size)


def eval_batches(dataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over ``dataset`` in order, rows ``dp_rank::dp_size``; every rank yields the same number of
    full micro batches (missing rows are all-IGNORE padding), so collective ops stay in step."""
    n = len(dataset)
    per_rank = -(-n // dp_size)
    n_batches = -(-per_rank // micro_batch_size)
    for b in range(n_batches):
        rows = []
        for k in range(micro_batch_size):
            g = (b * micro_batch_size + k) * dp_size + dp_rank
            if g < n:
                rows.append(dataset[g])
            else:
                filler = dict(dataset[0])
                filler["labels"] = torch.full_like(filler["labels"], IGNORE_INDEX)
                rows.append(filler)
        yield {k: torch.stack([r[k] for r in rows]) for k in BATCH_KEYS}


def batch_to(batch: dict, device) -> dict:
    """A micro-batch's tensors (and lists of tensors: the MTP inputs under CP) on ``device``; other values as they are."""
    import torch

    def move(v):
        if torch.is_tensor(v):
            return v.to(device)
        return [t.to(device) for t in v] if isinstance(v, list) else v
    return {k: move(v) for k, v in batch.items()}
