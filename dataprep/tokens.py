"""``launch data tokens SRC... --out FILE --tokenizer DIR|byte``: text and JSONL -> the pretraining token file.

Documents: one per JSONL record (its ``--text-key`` field, default ``text``); one per ``.txt`` file, or per
paragraph or line with ``--sample-by`` (as in ``datasets``' text loader). Empty and whitespace-only
documents are skipped. Each document's ids are followed by the tokenizer's end-of-sequence id, and
``FILE.idx`` lists where every document starts (dataprep.token_file describes the three files).

The main process reads the sources in order and cuts them into chunks of about ``CHUNK_BYTES``; worker
processes (spawned, tokenizers' own threads off) parse and tokenize the chunks; the main process writes
the results in chunk order, so the output is byte-identical for any ``--workers``. Everything is written
to staging files beside FILE and linked into place at the end: FILE appears complete or not at all, and
an existing FILE (or its .json/.idx) is never replaced.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from launcher.config_io import json_line
from launcher.errors import UserError

CHUNK_BYTES = 1 << 18  # input text per work item (a fraction of a second of tokenizing)
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
SAMPLE_BY = ("document", "paragraph", "line")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch data tokens",
        description="Tokenize text and JSONL into the flat memory-mapped token file a pretraining recipe reads "
                    "(data.kind=pretrain, data.path=FILE): uint16 ids when the vocabulary fits, else uint32; an "
                    "end-of-sequence id after every document; FILE.json (dtype, counts, tokenizer) and FILE.idx "
                    "(document offsets). Parallel worker processes; the result is the same for any --workers. "
                    "Never overwrites: FILE appears complete, or not at all.",
        epilog="example: launch data tokens corpus/ extra.jsonl.gz --out data/train.bin --tokenizer /ckpt/tokenizer --workers 8")
    p.add_argument("sources", nargs="+", metavar="SRC",
                   help="a .jsonl or .txt file (each may be .gz), or a directory: its such files, recursively, in name order")
    p.add_argument("--out", required=True, metavar="FILE", help="the token file to write (must not exist)")
    p.add_argument("--tokenizer", required=True, metavar="DIR|byte",
                   help="'byte' (the built-in byte tokenizer) or a tokenizer.json or a directory holding one; use the run's data.tokenizer")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="tokenizing processes (default: the CPUs available)")
    p.add_argument("--text-key", default="text", metavar="KEY", help="the field of a JSONL record holding its text (default: text)")
    p.add_argument("--sample-by", choices=SAMPLE_BY, default="document",
                   help="a .txt file is one document (default), one per paragraph (blank-line separated) or one per line")
    p.add_argument("--eos-token", metavar="TOKEN", help="the token ending every document (default: the tokenizer's eos token)")

    def error(message: str):
        raise UserError(message, "launch data tokens")

    p.error = error
    return p


# ------------------------------------------------------------------------------------------------ sources

def _kind(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def expand_sources(sources: list[str]) -> list[Path]:
    """The input files in reading order: files as given, directories' .jsonl/.txt(.gz) files recursively by name."""
    valid = "valid: .jsonl, .ndjson or .txt files (each may be .gz), or a directory of them"
    files: list[Path] = []
    for src in sources:
        path = Path(src).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p)
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise UserError(f"no input files in this directory ({valid})", src)
            files += found
        elif not path.exists():
            raise UserError("no such file or directory", src)
        elif _kind(path) is None:
            raise UserError(f"unknown input format ({valid})", src)
        else:
            files.append(path)
    return files


@dataclass
class Chunk:
    """A work item: documents (raw bytes, with the line each starts on) of one file, in order."""

    kind: str  # jsonl | text
    file: str
    docs: list[tuple[int, bytes]] = field(default_factory=list)
    size: int = 0
    end: int = 0  # input bytes read once this chunk is done (progress)


def read_chunks(files: list[Path], sample_by: str, chunk_bytes: int = CHUNK_BYTES):
    """Chunks of documents of every file in order; a chunk never spans files."""
    done = 0
    for path in files:
        kind = _kind(path)
        with open(path, "rb") as raw:
            stream = gzip.GzipFile(fileobj=raw) if path.name.lower().endswith(".gz") else raw
            chunk = Chunk(kind, str(path))

            def add(lineno: int, data: bytes):
                nonlocal chunk
                chunk.docs.append((lineno, data))
                chunk.size += len(data)
                if chunk.size >= chunk_bytes:
                    chunk.end = done + raw.tell()
                    out, chunk = chunk, Chunk(kind, str(path))
                    return out
                return None

            try:
                if kind == "jsonl":
                    for lineno, line in enumerate(stream, 1):
                        if line.strip() and (full := add(lineno, line)):
                            yield full
                elif sample_by == "line":  # each line without its line break
                    for lineno, line in enumerate(stream, 1):
                        if line.strip() and (full := add(lineno, _chomp(line))):
                            yield full
                elif sample_by == "paragraph":  # blank-line separated, without the last line break
                    para, first = [], 0
                    for lineno, line in enumerate(stream, 1):
                        if line.strip():
                            para.append(line)
                            first = first or lineno
                        elif para:
                            if full := add(first, _chomp(b"".join(para))):
                                yield full
                            para, first = [], 0
                    if para and (full := add(first, _chomp(b"".join(para)))):
                        yield full
                elif full := add(1, stream.read()):  # the whole file as it is (an empty one counts as skipped)
                    yield full
            except (OSError, EOFError, zlib.error) as e:  # a corrupt or cut-short .gz
                raise UserError(f"cannot read: {e}", str(path)) from None
            done += os.path.getsize(path)
            if chunk.docs:
                chunk.end = done
                yield chunk


def _chomp(line: bytes) -> bytes:
    return line[:-2] if line.endswith(b"\r\n") else line[:-1] if line.endswith(b"\n") else line


# ------------------------------------------------------------------------------------------------ workers

class Encoder:
    """Turns chunks into (token ids, document lengths, empty documents skipped); one per worker process."""

    def __init__(self, tokenizer: str, eos_id: int, dtype: str, text_key: str):
        import numpy as np

        from trainer.tokenizer import ByteTokenizer, load_tokenizer

        self.np = np
        self.tok = load_tokenizer(tokenizer)
        self.byte = isinstance(self.tok, ByteTokenizer)
        self.eos_id, self.dtype, self.text_key = eos_id, np.dtype(dtype), text_key

    def texts(self, chunk: Chunk) -> tuple[list[str], int]:
        texts, skipped = [], 0
        for lineno, data in chunk.docs:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                line = lineno + data[:e.start].count(b"\n")
                raise UserError(f"line {line}: not UTF-8 text (byte 0x{data[e.start]:02x})", chunk.file) from None
            if chunk.kind == "jsonl":
                text = self.record_text(text, lineno, chunk.file)
            if text.strip():
                texts.append(text)
            else:
                skipped += 1
        return texts, skipped

    def record_text(self, line: str, lineno: int, file: str) -> str:
        obj = json_line(line, lineno, file)
        if not isinstance(obj, dict):
            raise UserError(f"line {lineno}: expected a JSON object, got {type(obj).__name__}", file)
        if self.text_key not in obj:
            keys = ", ".join(map(repr, sorted(obj))) or "none"
            raise UserError(f"line {lineno}: no field {self.text_key!r} (found {keys}); name the text field with --text-key", file)
        text = obj[self.text_key]
        if not isinstance(text, str):
            raise UserError(f"line {lineno}: field {self.text_key!r} must be a string, got {type(text).__name__}", file)
        return text

    def encode(self, texts: list[str]) -> list:
        np = self.np
        if not self.byte:
            return self.tok.encode_batch(texts)
        # the byte tokenizer's ids are the UTF-8 bytes unless the text holds a special-token string
        return [self.tok.encode(t) if "<|" in t else np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]

    def __call__(self, chunk: Chunk):
        np = self.np
        texts, skipped = self.texts(chunk)
        eos = np.array([self.eos_id], np.int64)
        pieces = []
        for ids in self.encode(texts):
            pieces += (np.asarray(ids, np.int64), eos)
        flat = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
        if flat.size and int(flat.max()) > np.iinfo(self.dtype).max:
            raise UserError(f"token id {int(flat.max())} does not fit {self.dtype.name}", "--tokenizer")
        return flat.astype(self.dtype), np.array([len(p) + 1 for p in pieces[::2]], np.int64), skipped


_ENCODER: Encoder | None = None


def _init_worker(*args, child: bool = True) -> None:
    global _ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if child:  # Ctrl-C reaches the whole process group: the main process alone stops the run, cleanly
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _ENCODER = Encoder(*args)


def _work(chunk: Chunk):
    try:
        return _ENCODER(chunk)
    except UserError as e:
        return str(e)  # an error travels as its one line; the main process raises it in input order


# ------------------------------------------------------------------------------------------------ output

class Progress:
    """A progress line on stderr: redrawn in place on a terminal, a plain line every 30 s otherwise."""

    def __init__(self, total_bytes: int, stream=None):
        self.total, self.stream = max(total_bytes, 1), stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = self.last = time.monotonic()
        self.shown = False

    def line(self, done: int, docs: int, tokens: int) -> str:
        elapsed = time.monotonic() - self.start
        frac = min(done / self.total, 1.0)
        bar = "#" * int(frac * 12) + "." * (12 - int(frac * 12))
        eta = f" eta {_clock(elapsed * (1 - frac) / frac)}" if 0 < frac < 1 else ""
        return (f"tokens [{bar}] {frac:4.0%} {done / 2**20:,.1f}/{self.total / 2**20:,.1f} MiB, {docs:,} docs, "
                f"{_si(tokens)} tokens, {_si(tokens / max(elapsed, 1e-9))}/s, {_clock(elapsed)}{eta}")

    def update(self, done: int, docs: int, tokens: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < (0.2 if self.tty else 30):
            return
        self.last = now
        if self.tty:
            width = shutil.get_terminal_size().columns - 1  # a wrapped line cannot be redrawn in place
            self.stream.write("\r" + self.line(done, docs, tokens)[:width] + ("\n" if final else "\x1b[K"))
        elif not final or self.shown:  # a short run off a terminal prints only the summary
            self.stream.write(self.line(done, docs, tokens) + "\n")
        self.shown = True
        self.stream.flush()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _si(n: float) -> str:
    return next(f"{n / d:.3g}{u}" for d, u in ((1e9, "G"), (1e6, "M"), (1e3, "K"), (1, "")) if n >= d or d == 1)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def _publish(staged: list[tuple[Path, Path]]) -> None:
    """Link each staging file to its final name (never replacing a file), in order; all or nothing."""
    done: list[Path] = []
    try:
        for src, dst in staged:
            try:
                os.link(src, dst)
            except FileExistsError:
                raise UserError("appeared while tokenizing; it is left as it is (choose another --out)", str(dst)) from None
            except OSError:  # a file system without hard links: check, then rename (not replacing in practice)
                if dst.exists():
                    raise UserError("appeared while tokenizing; it is left as it is (choose another --out)", str(dst)) from None
                os.rename(src, dst)
            done.append(dst)
    except BaseException:
        for dst in done:
            dst.unlink(missing_ok=True)
        raise


def _workers(n: int | None) -> int:
    if n is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n < 1:
        raise UserError(f"must be >= 1, got {n}", "--workers")
    return n


def main(argv: list[str]) -> int:
    global _ENCODER
    args = _parser().parse_args(argv)
    try:
        import numpy as np
        import tokenizers  # noqa: F401
    except ImportError as e:
        raise UserError(f"needs the job-side packages ({e.name} is missing): pip install 'moe-launch[train]'", "launch data tokens") from None
    from dataprep.token_file import dtype_for_vocab, index_path, sidecar_path
    from trainer.tokenizer import load_tokenizer

    workers = _workers(args.workers)
    files = expand_sources(args.sources)
    out = Path(args.out).expanduser()
    finals = [out, sidecar_path(out), index_path(out)]
    for f in finals:
        if f.exists() or f.is_symlink():
            raise UserError("exists; launch data tokens never overwrites (remove it or choose another --out)", str(f))
    if out.parent.exists() and not out.parent.is_dir():
        raise UserError("is not a directory", str(out.parent))
    tok = load_tokenizer(args.tokenizer)
    if args.eos_token is not None:
        eos_id = tok.token_to_id(args.eos_token)
        if eos_id is None:
            raise UserError(f"{args.eos_token!r} is not a token of {args.tokenizer}", "--eos-token")
    elif tok.eos_id is None:
        raise UserError("has no end-of-sequence token (tokenizer_config.json eos_token, or </s>, <|endoftext|>, "
                        "<|end▁of▁sentence|>); name the one ending each document with --eos-token", args.tokenizer)
    else:
        eos_id = tok.eos_id
    vocab_size = max(tok.vocab_size, eos_id + 1)
    dtype = dtype_for_vocab(vocab_size)
    tokenizer = "byte" if args.tokenizer == "byte" else str(Path(args.tokenizer).expanduser().resolve())
    init = (tokenizer, eos_id, dtype, args.text_key)

    old_env = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # workers inherit it; one process stays one core, as asked
    created = [d for d in [out.parent, *out.parent.parents] if not d.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging: list[Path] = []
    pool = None
    ok = False
    try:
        import tempfile

        for suffix in (".partial", ".json.partial", ".idx.partial"):
            fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=suffix)
            os.close(fd)
            staging.append(Path(name))
        start = time.monotonic()
        progress = Progress(sum(os.path.getsize(f) for f in files))
        docs = tokens = skipped = 0
        chunks = read_chunks(files, args.sample_by)
        with open(staging[0], "wb") as tok_f, open(staging[2], "wb") as idx_f:
            np.zeros(1, np.uint64).tofile(idx_f)

            def write(chunk: Chunk, result) -> None:
                nonlocal docs, tokens, skipped
                if isinstance(result, str):
                    raise UserError(result)
                ids, lengths, n_skipped = result
                ids.tofile(tok_f)
                (np.cumsum(lengths, dtype=np.uint64) + np.uint64(tokens)).tofile(idx_f)
                docs, tokens, skipped = docs + len(lengths), tokens + len(ids), skipped + n_skipped
                progress.update(chunk.end, docs, tokens)

            if workers == 1:
                _init_worker(*init, child=False)
                for chunk in chunks:
                    write(chunk, _work(chunk))
            else:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor

                pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                           initializer=_init_worker, initargs=init)
                pending: deque = deque()
                for chunk in chunks:
                    pending.append((chunk, pool.submit(_work, chunk)))
                    if len(pending) >= 2 * workers + 2:  # bounded read-ahead: memory stays flat on any corpus
                        c, fut = pending.popleft()
                        write(c, fut.result())
                while pending:
                    c, fut = pending.popleft()
                    write(c, fut.result())
        if docs == 0:
            where = ", ".join(map(str, files)) if len(files) <= 3 else f"{files[0]} and {len(files) - 1} more files"
            raise UserError("no documents: the input is empty or whitespace only", where)
        progress.update(progress.total, docs, tokens, final=True)
        elapsed = time.monotonic() - start
        meta = {"dtype": dtype, "tokens": tokens, "documents": docs, "eos_id": eos_id, "vocab_size": vocab_size,
                "tokenizer": tokenizer, "index": index_path(out).name, "created_by": "launch data tokens",
                "sources": [str(f) for f in files]}
        staging[1].write_text(json.dumps(meta, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        for s in staging:
            os.chmod(s, 0o666 & ~umask)
        _publish([(staging[2], finals[2]), (staging[1], finals[1]), (staging[0], finals[0])])  # FILE last
        ok = True
    finally:
        _ENCODER = None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for s in staging:
            s.unlink(missing_ok=True)
        if not ok:
            for d in created:  # directories this run made, innermost first, if still empty
                try:
                    d.rmdir()
                except OSError:
                    break
        if old_env is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old_env

    size = out.stat().st_size
    skipped_note = f" ({skipped:,} empty skipped)" if skipped else ""
    print(f"tokenized {len(files)} file(s): {docs:,} documents{skipped_note}, {tokens:,} tokens in {elapsed:.1f} s "
          f"({tokens / max(elapsed, 1e-9):,.0f} tokens/s, {workers} worker{'s' if workers > 1 else ''})")
    print(f"wrote {out}: {_size(size)}, {dtype} (vocab {vocab_size:,}, eos id {eos_id} after every document); "
          f"{sidecar_path(out).name}, {index_path(out).name} ({docs + 1:,} document offsets)")
    print(f"train on it: data.kind=pretrain data.path={out} data.tokenizer={args.tokenizer}")
    return 0
