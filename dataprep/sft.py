"""``launch data sft SRC... --out DIR``: raw records -> the SFT directory the trainer reads as is.

Reads JSONL, JSON, CSV/TSV, Parquet, Arrow and ``datasets`` save_to_disk directories (dataprep.readers),
maps each record to an ``input``/``output`` pair (field names, or a chat conversation), drops empty and
duplicate records, counts tokens exactly as the trainer does (trainer.chat.render_chat with the run's
tokenizer; a record of more than ``seq_length + 1`` tokens is one the trainer truncates), splits with a
seed, and writes ``training/validation/test.jsonl`` and ``stats.json``. Every other field of a record
rides along as metadata. Everything is checked and computed in memory first; the files are written
into a staging directory beside DIR and renamed into place, so a refusal writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import UserError
from launcher.sft_format import SPLIT_FILES, STATS_FILE, STATS_TOOL

TEMPLATES = ("chatml", "plain", "jinja", "raw")
TRAINER_TEMPLATE = {"chatml": "chatml", "plain": "plain", "jinja": "raw", "raw": "raw"}
SPLITS = tuple(SPLIT_FILES)  # training, validation, test
SPLIT_ALIASES = {"train": "training", "training": "training", "validation": "validation", "val": "validation",
                 "valid": "validation", "dev": "validation", "test": "test", "testing": "test"}
DEFAULT_RATIOS = "0.9,0.05,0.05"
PAIR_KEYS = (("instruction", "output"), ("input", "output"), ("prompt", "completion"), ("prompt", "response"),
             ("question", "answer"))
CHAT_KEYS = ("messages", "conversations")
ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
                "model": "assistant", "system": "system"}
SHOWN = 3  # record locations shown per reason in the summary (stats.json keeps up to 100)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch data sft",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Turn raw records into the SFT directory a recipe trains on (data.path=DIR): training.jsonl,\n"
                    "validation.jsonl and test.jsonl with string fields input/output plus every other field of the\n"
                    "record, and stats.json. Empty and duplicate records are dropped; records longer than seq_length + 1\n"
                    "tokens (counted with the run's tokenizer exactly as the trainer counts them) are kept and reported\n"
                    "(the trainer truncates them) unless --drop-long. Nothing is written unless everything checks out;\n"
                    "DIR must be new or empty.",
        epilog="templates:\n"
               "  chatml, plain  input/output stay text; the trainer renders them (recipe data.template=chatml|plain)\n"
               "  jinja          rendered here with the chat_template of --tokenizer DIR; recipe data.template=raw\n"
               "  raw            records already rendered; written as they are; recipe data.template=raw\n"
               "chat records (--messages-key, or a messages/conversations field): role/content or ShareGPT from/value;\n"
               "the last assistant message is the output, everything before it the prompt.\n\n"
               "examples:\n"
               "  launch data sft raw.jsonl --out data/sft --input-key question --output-key answer --seq-length 4096\n"
               "  launch data sft chats.parquet --out data/sft --template jinja --tokenizer /ckpt/deepseek-v3-bf16\n"
               "  launch data sft my_dataset_dict/ --out data/sft --split source --tokenizer /ckpt/tokenizer")
    p.add_argument("sources", nargs="+", metavar="SRC",
                   help="a .jsonl, .json, .csv, .tsv (each may be .gz), .parquet or .arrow file, or a directory saved by "
                        "datasets' save_to_disk (Dataset or DatasetDict); several are read in order")
    p.add_argument("--out", required=True, metavar="DIR", help="the SFT directory to write (must not exist, or be empty)")
    p.add_argument("--input-key", metavar="KEY", help="the field holding the prompt (default: input, prompt, question or "
                   "instruction, whichever the first record has; instruction takes an Alpaca-style input field along)")
    p.add_argument("--output-key", metavar="KEY", help="the field holding the answer (default: output, completion, response or answer)")
    p.add_argument("--messages-key", metavar="KEY", help="the field holding a chat conversation (default: messages or conversations)")
    p.add_argument("--template", choices=TEMPLATES, default="chatml", help="see below (default: chatml)")
    p.add_argument("--tokenizer", default="byte", metavar="byte|DIR",
                   help="the run's tokenizer (its data.tokenizer), for token counts; with --template jinja, a directory whose "
                        "tokenizer_config.json has the chat_template (default: byte)")
    p.add_argument("--seq-length", type=int, default=4096, metavar="N", help="the run's data.seq_length (default: 4096)")
    p.add_argument("--split", default=None, metavar="RATIOS|source",
                   help=f"training,validation[,test] shares summing to 1 (default: {DEFAULT_RATIOS}), or 'source': each "
                        "source's own split (a DatasetDict's split names, or files named train/validation/test...)")
    p.add_argument("--split-column", metavar="NAME", help="take each record's split from this field instead "
                   "(train/training, validation/val/valid/dev, test/testing)")
    p.add_argument("--seed", type=int, default=1234, help="the seed of the random split (default: 1234)")
    p.add_argument("--drop-long", action="store_true", help="drop records longer than seq_length + 1 tokens (default: keep "
                   "them and report them; the trainer truncates them)")
    p.add_argument("--keep-duplicates", action="store_true", help="keep records whose input and output repeat an earlier "
                   "record's (default: drop them)")

    def error(message: str):
        raise UserError(message, "launch data sft")

    p.error = error
    return p


@dataclass
class Example:
    input: str
    output: str
    meta: dict
    file: str
    where: str
    empty: bool
    split: str | None = None  # from --split-column or --split source
    prompt_tokens: int = 0
    tokens: int = 0

    @property
    def at(self) -> str:
        return f"{self.file} {self.where}"


# ------------------------------------------------------------------------------------------- fields

def _text(data: dict, key: str, row) -> str:
    """A field's text: strings as they are, numbers written out, null as empty; anything else is refused."""
    if key not in data:
        raise UserError(f"{row.where}: field {key!r} is missing (the record has {', '.join(map(repr, data)) or 'no fields'})", row.file)
    value = data[key]
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise UserError(f"{row.where}: field {key!r}: expected text, got {type(value).__name__}", row.file)


class Mapper:
    """One raw record -> Example: input/output text for the chosen template, and the remaining fields."""

    def __init__(self, args, first, chat_template, tok):
        self.template, self.chat, self.tok = args.template, chat_template, tok
        self.split_column = args.split_column
        if args.messages_key and (args.input_key or args.output_key):
            raise UserError("give --messages-key for chat records, or --input-key/--output-key, not both", "--messages-key")
        data = first.data if first is not None else {}
        if args.messages_key:
            self.kind, self.keys = "chat", (args.messages_key,)
        elif args.input_key or args.output_key:
            self.kind, self.keys = "pair", (args.input_key or "input", args.output_key or "output")
        elif found := next((k for k in CHAT_KEYS if k in data), None):
            self.kind, self.keys = "chat", (found,)
        elif found := next((pair for pair in PAIR_KEYS if all(k in data for k in pair)), None):
            self.kind, self.keys = "pair", found
        else:
            raise UserError(f"{first.where}: no input/output fields (found {', '.join(map(repr, data)) or 'none'}); name them "
                            "with --input-key and --output-key, or --messages-key for chat records", first.file)
        if self.kind == "chat" and self.template == "raw":
            raise UserError("raw takes records already rendered as input/output text, not chat records; use jinja, chatml "
                            "or plain", "--template")
        self.context = self.kind == "pair" and self.keys[0] == "instruction" and self.keys[1] != "input"
        self.eos_text = tok.decode([tok.eos_id]) if tok.eos_id is not None else ""

    def describe(self) -> str:
        if self.kind == "chat":
            return f"chat conversations <- {self.keys[0]}"
        extra = " (+ input)" if self.context else ""
        return f"input <- {self.keys[0]}{extra}, output <- {self.keys[1]}"

    def __call__(self, row) -> Example:
        data = row.data
        consumed = set(self.keys)
        if self.kind == "pair":
            prompt, answer = _text(data, self.keys[0], row), _text(data, self.keys[1], row)
            if self.context and "input" in data:
                consumed.add("input")
                context = _text(data, "input", row)
                prompt = prompt + "\n\n" + context if context.strip() else prompt
            empty = not prompt.strip() or not answer.strip()
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        else:
            messages = self._messages(data, row)
            answer = messages[-1]["content"]
            empty = not answer.strip() or not any(m["content"].strip() for m in messages[:-1])
        meta = {k: v for k, v in data.items() if k not in consumed}
        for k in ("input", "output"):
            if k in meta:
                raise UserError(f"{row.where}: field {k!r} would be replaced by the {k} written from "
                                f"{self.describe()}; rename it in the data, or map it with --{k}-key", row.file)
        split = None
        if self.split_column is not None:
            split = _split_value(data, self.split_column, row)
        if empty:
            return Example("", "", meta, row.file, row.where, True, split)
        if self.template == "jinja":
            prompt, answer = self._render(messages, row)
        elif self.kind == "chat":
            prompt = self._flatten(messages, row)
        return Example(prompt, answer, meta, row.file, row.where, False, split)

    def _messages(self, data: dict, row) -> list[dict]:
        key = self.keys[0]
        if key not in data:
            raise UserError(f"{row.where}: field {key!r} is missing (the record has {', '.join(map(repr, data)) or 'no fields'})", row.file)
        value = data[key]
        if not isinstance(value, list) or not value:
            raise UserError(f"{row.where}: field {key!r}: expected a non-empty list of messages", row.file)
        out = []
        for i, m in enumerate(value):
            at = f"{row.where}: field {key!r}, message {i + 1}"
            if not isinstance(m, dict):
                raise UserError(f"{at}: expected an object with role/content (or from/value)", row.file)
            rk, ck = ("role", "content") if "role" in m else ("from", "value")
            if rk not in m or ck not in m:
                raise UserError(f"{at}: needs role and content (or ShareGPT's from and value); has {', '.join(map(repr, m))}", row.file)
            role, content = m[rk], m[ck]
            if content is None:
                content = ""
            if not isinstance(role, str) or not isinstance(content, str):
                raise UserError(f"{at}: {rk} and {ck} must be text", row.file)
            role = ROLE_ALIASES.get(role.lower(), role)
            if role not in ("user", "assistant", "system") and self.template != "jinja":
                raise UserError(f"{at}: role {role!r}: {self.template} knows system, user and assistant (human/gpt); "
                                "--template jinja passes other roles to the tokenizer's chat template", row.file)
            out.append({"role": role, "content": content})
        if out[-1]["role"] != "assistant":
            raise UserError(f"{row.where}: field {key!r}: the last message is {out[-1]['role']!r}; it must be the assistant's "
                            "answer (the output)", row.file)
        if len(out) < 2:
            raise UserError(f"{row.where}: field {key!r}: only an answer; a conversation needs a message before it", row.file)
        return out

    def _flatten(self, messages: list[dict], row) -> str:
        """The prompt text that makes the trainer's chatml/plain rendering equal the template's Jinja twin of the
        whole conversation (trainer.chat.JINJA), system messages joined to the first user message."""
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        turns = [dict(m) for m in messages[:-1] if m["role"] != "system"]
        if not turns or turns[0]["role"] != "user" or turns[-1]["role"] != "user":
            raise UserError(f"{row.where}: field {self.keys[0]!r}: {self.template} conversations start with a user message and "
                            "the answer follows one; --template jinja takes others", row.file)
        if system:
            turns[0]["content"] = system + "\n\n" + turns[0]["content"]
        if self.template == "chatml":
            return "".join(m["content"] if i == 0 else f"<|im_end|>\n<|im_start|>{m['role']}\n{m['content']}"
                           for i, m in enumerate(turns))
        return "".join(m["content"] + (self.eos_text if m["role"] == "assistant" else "\n") for m in turns)[:-1]

    def _render(self, messages: list[dict], row) -> tuple[str, str]:
        try:
            prompt = self.chat.render(messages[:-1], add_generation_prompt=True)
            whole = self.chat.render(messages, add_generation_prompt=False)
        except ValueError as e:
            raise UserError(f"{row.where}: {e}", row.file) from None
        if not whole.startswith(prompt):
            raise UserError(f"{row.where}: the chat template of {self.chat.source} does not render this conversation as "
                            "prompt + answer (the prompt with add_generation_prompt is not the start of the whole "
                            "conversation), so the answer cannot be told apart", row.file)
        return prompt, whole[len(prompt):]


def _split_value(data: dict, column: str, row) -> str:
    if column not in data:
        raise UserError(f"{row.where}: field {column!r} (--split-column) is missing", row.file)
    value = data[column]
    name = SPLIT_ALIASES.get(value.strip().lower()) if isinstance(value, str) else None
    if name is None:
        raise UserError(f"{row.where}: field {column!r}: {data[column]!r} is not a split; use train/training, "
                        "validation/val/valid/dev or test/testing", row.file)
    return name


def split_of_source(name: str) -> str | None:
    """training/validation/test from a source's name: a DatasetDict split, or the first word of a file name
    that is a split (``train.jsonl``, ``test-00000-of-00001.parquet``, ``my_dev_set.csv``)."""
    import re

    for word in re.split(r"[-_.\s]+", name.lower()):
        if word in SPLIT_ALIASES:
            return SPLIT_ALIASES[word]
    return None


# ------------------------------------------------------------------------------------------ tokens

class _BatchedEncode:
    """The tokenizer, with ``encode`` answered from a table that one ``encode_batch`` call fills: render_chat runs
    once to learn which texts it encodes, then again on their ids (the Rust library encodes a batch in parallel)."""

    def __init__(self, tok):
        self._tok, self.table, self.wanted = tok, {}, set()

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode(self, text: str) -> list[int]:
        ids = self.table.get(text)
        if ids is None:
            self.wanted.add(text)
            return []
        return ids

    def fill(self) -> None:
        texts = list(self.wanted)
        self.table, self.wanted = dict(zip(texts, self._tok.encode_batch(texts))), set()


def count_tokens(examples: list[Example], template: str, tok, chunk: int = 2048) -> None:
    """Fill ``prompt_tokens`` and ``tokens`` (prompt + answer) from trainer.chat.render_chat: what the trainer feeds."""
    from trainer.chat import render_chat

    batched = _BatchedEncode(tok) if hasattr(tok, "encode_batch") else None
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        if batched is not None:
            batched.table = {}
            for ex in part:
                render_chat(template, ex.input, ex.output, batched)
            batched.fill()
        for ex in part:
            p, a = render_chat(template, ex.input, ex.output, batched or tok)
            ex.prompt_tokens, ex.tokens = len(p), len(p) + len(a)


def trainer_stats(examples: list[Example], seq_length: int) -> dict:
    """What trainer.data.SFTDataset(answer_only_loss=True).stats() reports for these records: samples, truncated
    (more than seq_length + 1 tokens), dropped_tokens, label_tokens, skipped (a single token: nothing to predict)."""
    keep = seq_length + 1
    out = {"samples": 0, "truncated": 0, "dropped_tokens": 0, "label_tokens": 0, "skipped": 0, "tokens": 0}
    for ex in examples:
        n = min(ex.tokens, keep)
        if n < 2:
            out["skipped"] += 1
            continue
        out["samples"] += 1
        out["tokens"] += ex.tokens
        out["truncated"] += ex.tokens > keep
        out["dropped_tokens"] += max(0, ex.tokens - keep)
        out["label_tokens"] += max(0, (n - 1) - max(ex.prompt_tokens - 1, 0))
    return out


def histogram(lengths: list[int], bins: int = 10) -> list[tuple[int, int, int]]:
    """(low, high, count) buckets of equal, round width (1, 2, 5 x 10^k) covering min..max."""
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    width = next(m * 10**k for k in range(30) for m in (1, 2, 5) if m * 10**k * bins >= hi - lo + 1)
    start = lo // width * width
    counts = [0] * ((hi - start) // width + 1)
    for n in lengths:
        counts[(n - start) // width] += 1
    return [(start + i * width, start + (i + 1) * width - 1, c) for i, c in enumerate(counts)]


# ------------------------------------------------------------------------------------------- split

def parse_ratios(text: str) -> dict[str, float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (2, 3) or any(v < 0 or v != v for v in values):
        raise UserError(f"{text!r}: give 2 or 3 shares >= 0 (training,validation[,test]) such as {DEFAULT_RATIOS}, "
                        "or 'source'", "--split")
    if abs(sum(values) - 1) > 1e-6 or values[0] == 0:
        raise UserError(f"{text!r}: the shares must sum to 1 and give training some, e.g. {DEFAULT_RATIOS}", "--split")
    return dict(zip(SPLITS, values))


def split_examples(examples: list[Example], ratios: dict[str, float] | None, seed: int) -> dict[str, list[Example]]:
    """Ratios: a shuffle of the records by ``random.Random(seed)`` (the same for every run and Python process) cut
    into round(n x share) records for validation and test, the rest for training; each split keeps the source
    order. Without ratios: each record's own split."""
    if ratios is None:
        return {s: [ex for ex in examples if ex.split == s] for s in SPLITS}
    n = len(examples)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    sizes = {s: int(n * ratios.get(s, 0.0) + 0.5) for s in SPLITS[1:]}
    for s, size in sizes.items():
        if ratios.get(s, 0.0) > 0 and size == 0:
            raise UserError(f"the {s} split would be empty: {n} record(s) x {ratios[s]:g} rounds to 0; give it a larger "
                            "share, or 0 for none", "--split")
    n_train = n - sum(sizes.values())
    if n_train < 1:
        raise UserError(f"the training split would be empty ({n} record(s)); give it a larger share", "--split")
    cuts = {"training": order[:n_train], "validation": order[n_train:n_train + sizes["validation"]],
            "test": order[n_train + sizes["validation"]:]}
    return {s: [examples[i] for i in sorted(idx)] for s, idx in cuts.items()}


# ------------------------------------------------------------------------------------------ output

def _check_out(out: Path) -> None:
    if out.is_dir():
        if any(out.iterdir()):
            raise UserError(f"{out} is not empty; launch data sft never overwrites: choose a new directory", "--out")
    elif out.exists():
        raise UserError(f"{out} exists and is not a directory", "--out")


def _json_default(value):
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def write_directory(out: Path, splits: dict[str, list[Example]], stats: dict) -> None:
    """The split files and stats.json into a staging directory beside ``out``, renamed into place at the end."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)
        for split, examples in splits.items():
            if not examples:
                continue
            with open(staging / SPLIT_FILES[split], "w", encoding="utf-8") as f:
                for ex in examples:
                    f.write(json.dumps({"input": ex.input, "output": ex.output, **ex.meta}, ensure_ascii=False,
                                       default=_json_default) + "\n")
        (staging / STATS_FILE).write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _check_out(out)
        try:
            os.rename(staging, out)  # replaces an empty directory, never a non-empty one
        except OSError as e:
            raise UserError(f"cannot move the result into place ({e.strerror})", "--out") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# -------------------------------------------------------------------------------------------- main

def _load_tokenizer(spec: str):
    from trainer.tokenizer import load_tokenizer

    try:
        return load_tokenizer(spec)
    except ImportError:
        raise UserError("reading a tokenizer.json needs the tokenizers library: pip install tokenizers", "--tokenizer") from None


def _first_locations(examples: list[Example], limit: int = 100) -> list[str]:
    return [ex.at for ex in examples[:limit]]


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    from dataprep import readers

    out = Path(args.out).expanduser()
    _check_out(out)
    if args.seq_length < 1:
        raise UserError(f"must be >= 1, got {args.seq_length}", "--seq-length")
    if args.split_column and args.split is not None:
        raise UserError("give --split or --split-column, not both", "--split-column")
    by_source = args.split == "source"
    ratios = None if (args.split_column or by_source) else parse_ratios(args.split or DEFAULT_RATIOS)
    sources = [Path(s).expanduser() for s in args.sources]
    formats = [readers.source_format(s) for s in sources]
    if args.template == "jinja" and args.tokenizer == "byte":
        raise UserError("jinja renders the chat template of a tokenizer directory: give --tokenizer DIR (its "
                        "tokenizer_config.json has the chat_template)", "--template")
    tok = _load_tokenizer(args.tokenizer)
    chat = None
    if args.template == "jinja":
        from dataprep.chat_template import ChatTemplate

        chat = ChatTemplate(args.tokenizer)

    # read and map every record (errors name the file, the line and the field)
    examples: list[Example] = []
    per_source = []
    mapper = None
    for src, fmt in zip(sources, formats):
        n = 0
        for row in readers.read(src):
            if mapper is None:
                mapper = Mapper(args, row, chat, tok)
            ex = mapper(row)
            if by_source:
                ex.split = split_of_source(row.source_split or "")
                if ex.split is None:
                    raise UserError(f"--split source: cannot tell the split from the name {row.source_split!r}; name the "
                                    "files train/validation/test..., or use --split RATIOS or --split-column", str(src))
            examples.append(ex)
            n += 1
        per_source.append({"path": str(src), "format": fmt, "records": n})
    if not examples:
        raise UserError("has no records" if len(sources) == 1 else f"none of the {len(sources)} sources has records",
                        str(sources[0]) if len(sources) == 1 else "SRC")

    # drop: empty, duplicate, over-long
    dropped: dict[str, list[Example]] = {"empty": [], "duplicate": [], "long": []}
    kept: list[Example] = []
    duplicates: list[Example] = []
    seen: set[tuple[str, str]] = set()
    for ex in examples:
        if ex.empty:
            dropped["empty"].append(ex)
            continue
        key = (ex.input, ex.output)
        if key in seen:
            duplicates.append(ex)
            if not args.keep_duplicates:
                continue
        seen.add(key)
        kept.append(ex)
    if not args.keep_duplicates:
        dropped["duplicate"] = duplicates
    template = TRAINER_TEMPLATE[args.template]
    count_tokens(kept, template, tok)
    limit = args.seq_length + 1
    long = [ex for ex in kept if ex.tokens > limit]
    if args.drop_long:
        dropped["long"] = long
        kept = [ex for ex in kept if ex.tokens <= limit]
    if not kept:
        raise UserError(f"no records left of {len(examples)} after dropping "
                        + ", ".join(f"{len(v)} {k}" for k, v in dropped.items() if v), str(sources[0]))

    splits = split_examples(kept, ratios, args.seed)
    wanted = [s for s in SPLITS if (ratios or {}).get(s, 0) > 0] if ratios else sorted(
        {ex.split for ex in examples}, key=SPLITS.index)
    for s in wanted:
        if not splits[s]:
            raise UserError(f"the {s} split is empty: all its records were dropped "
                            f"({', '.join(f'{len(v)} {k}' for k, v in dropped.items() if v)})",
                            "--split-column" if args.split_column else "--split")
    if not splits["training"]:
        where = f"field {args.split_column!r} (--split-column)" if args.split_column else "--split source"
        raise UserError(f"no training records: {where} gives only "
                        f"{', '.join(s for s in SPLITS if splits[s]) or 'none'}", where)

    lengths = [ex.tokens for ex in kept]
    split_stats = {s: {"records": len(v), **trainer_stats(v, args.seq_length)} for s, v in splits.items() if v}
    if args.split_column:
        split_spec = {"column": args.split_column}
    elif by_source:
        split_spec = {"source": True}
    else:
        split_spec = {"ratios": [ratios[s] for s in SPLITS if s in ratios], "seed": args.seed}
    stats = {
        "tool": STATS_TOOL,
        "template": template,
        "rendered_with": f"{chat.source} chat_template" if chat else None,
        "tokenizer": args.tokenizer,
        "seq_length": args.seq_length,
        "sources": per_source,
        "fields": mapper.describe(),
        "split": split_spec,
        "records": {"read": len(examples), "kept": len(kept), "over_long": len(long), "duplicates": len(duplicates)},
        "drop_long": args.drop_long,
        "keep_duplicates": args.keep_duplicates,
        "dropped": {k: {"count": len(v), "first": _first_locations(v)} for k, v in dropped.items()},
        "over_long": _first_locations(long),
        "splits": split_stats,
        "tokens_per_record": {"min": min(lengths), "max": max(lengths), "mean": round(sum(lengths) / len(lengths), 2)},
        "histogram": [{"low": lo, "high": hi, "count": c} for lo, hi, c in histogram(lengths)],
    }
    write_directory(out, splits, stats)
    print(summary(args, stats, mapper, kept, dropped, long, duplicates, splits, out))
    return 0


def summary(args, stats, mapper, kept, dropped, long, duplicates, splits, out) -> str:
    src = ", ".join(f"{s['path']} ({s['format']}, {s['records']})" for s in stats["sources"])
    meta = list(dict.fromkeys(k for ex in kept for k in ex.meta))
    if args.template in ("chatml", "plain"):
        how = f"input/output stay text; the trainer renders them (recipe data.template={args.template})"
    elif args.template == "jinja":
        how = f"rendered with {stats['rendered_with']}; train with data.template=raw"
    else:
        how = "records already rendered, written as they are; train with data.template=raw"
    t = stats["tokens_per_record"]
    limit = args.seq_length + 1
    long_note = (f"{len(long)} over {limit} " + ("dropped (--drop-long)" if args.drop_long else
                 "kept: the trainer truncates them (--drop-long drops them)")) if long else f"none over {limit}"
    lines = [f"read      {stats['records']['read']} record(s): {src}",
             f"fields    {mapper.describe()}; metadata carried: {', '.join(meta) or 'none'}",
             f"template  {args.template}: {how}",
             f"tokens    {args.tokenizer} tokenizer, seq_length {args.seq_length}: {t['min']}-{t['max']} per record "
             f"(mean {t['mean']:g}); {long_note}"]
    gone = [(k, v) for k, v in dropped.items() if v and k != "long"]
    if gone:
        lines.append("dropped   " + "; ".join(f"{len(v)} {k} ({', '.join(ex.at for ex in v[:SHOWN])}{', ...' if len(v) > SHOWN else ''})"
                                            for k, v in gone))
    if duplicates and args.keep_duplicates:
        lines.append(f"kept      {len(duplicates)} duplicate(s) (--keep-duplicates): {', '.join(ex.at for ex in duplicates[:SHOWN])}"
                     f"{', ...' if len(duplicates) > SHOWN else ''}")
    if long:
        lines.append(f"over-long {', '.join(ex.at for ex in long[:SHOWN])}{', ...' if len(long) > SHOWN else ''}")
    spec = stats["split"]
    how_split = (f"seed {spec['seed']}, shares {','.join(f'{r:g}' for r in spec['ratios'])}" if "ratios" in spec
                 else f"by field {spec['column']!r}" if "column" in spec else "by source")
    lines.append(f"split     {how_split}: " + ", ".join(f"{s} {len(v)}" for s, v in splits.items() if v))
    lines.append("lengths   tokens per record (prompt + answer, as the trainer counts them):")
    lengths = [ex.tokens for ex in kept]
    bins = histogram(lengths)
    peak = max(c for _, _, c in bins)
    names = [f"{lo}-{hi}" if hi > lo else str(lo) for lo, hi, _ in bins]
    label = max(map(len, names))
    for name, (lo, hi, c) in zip(names, bins):
        over = sum(lo <= n <= hi and n > limit for n in lengths) if hi > limit else 0
        mark = f" ({over} over {limit})" if over else ""
        lines.append(f"  {name:>{label}} |{'#' * round(30 * c / peak):<30}| {c}{mark}")
    files = [f"{SPLIT_FILES[s]} ({len(v)})" for s, v in splits.items() if v]
    lines.append(f"wrote     {out}: {', '.join(files)}, {STATS_FILE}")
    return "\n".join(lines)
