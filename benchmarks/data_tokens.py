"""Tokens/s of ``launch data tokens`` against a plain one-process loop over the same tokenizer, in one run.

Corpus: synthetic JSONL (Zipf-distributed pseudo-words, documents of 50-2000 words, ``--mb`` MiB) in a
temporary directory, and a byte-level BPE tokenizer (8192 ids) trained on its first 400 documents. Ours: the
whole command, ``launch data tokens corpus.jsonl --out FILE --tokenizer DIR --workers N`` (process
start-up, reading, writing FILE/.json/.idx included). Peer: the loop a user would write: read each
line, ``json.loads``, ``tokenizer.encode(text)`` (trainer.tokenizer.HFTokenizer, the trainer's own),
append the eos id, write the ids with numpy. Both must produce the same ids; the script checks it,
then prints tokens/s of each and the ratio ours / peer (target >= 1.6 with 2 workers on 2 cores).

    python benchmarks/data_tokens.py [--mb 8] [--workers 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the peer is one process on one core, as ours is per worker

import numpy as np  # noqa: E402

from launcher.cli import main as launch  # noqa: E402
from trainer.tokenizer import load_tokenizer  # noqa: E402


def make_corpus(directory: Path, mb: float, seed: int = 0) -> Path:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 10))) for _ in range(20000)]
    weights = [1 / (i + 1) for i in range(len(words))]
    path, size = directory / "corpus.jsonl", 0
    with open(path, "w") as f:
        while size < mb * 2**20:
            n = rng.randint(50, 2000)
            text = " ".join(rng.choices(words, weights, k=n)).capitalize() + ".\n" + " ".join(rng.choices(words, weights, k=20))
            line = json.dumps({"text": text, "id": size}) + "\n"
            f.write(line)
            size += len(line)
    return path


def make_tokenizer(directory: Path, corpus: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    with open(corpus) as f:
        sample = [json.loads(line)["text"] for _, line in zip(range(400), f)]
    tk.train_from_iterator(sample, trainer)
    out = directory / "tokenizer"
    out.mkdir()
    tk.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return out


def peer(corpus: Path, tokenizer: Path, out: Path) -> int:
    tok = load_tokenizer(str(tokenizer))
    ids: list[int] = []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            ids += tok.encode(json.loads(line)["text"])
            ids.append(tok.eos_id)
    np.asarray(ids, np.uint16).tofile(out)
    return len(ids)


def ours(corpus: Path, tokenizer: Path, out: Path, workers: int) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        code = launch(["data", "tokens", str(corpus), "--out", str(out), "--tokenizer", str(tokenizer), "--workers", str(workers)])
    assert code == 0
    return json.loads(Path(str(out) + ".json").read_text())["tokens"]


def timed(fn, *args) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn(*args)
    return time.perf_counter() - t0, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=8.0, help="corpus size in MiB (default 8)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = make_corpus(tmp, args.mb)
        tokenizer = make_tokenizer(tmp, corpus)
        t_peer, t_ours, t_one = [], [], []
        for r in range(args.repeat):
            t, n_peer = timed(peer, corpus, tokenizer, tmp / f"peer-{r}.bin")
            t_peer.append(t)
            t, n_ours = timed(ours, corpus, tokenizer, tmp / f"ours-{r}.bin", args.workers)
            t_ours.append(t)
            t, _ = timed(ours, corpus, tokenizer, tmp / f"one-{r}.bin", 1)
            t_one.append(t)
            if (tmp / f"peer-{r}.bin").read_bytes() != (tmp / f"ours-{r}.bin").read_bytes():
                print("MISMATCH: launch data tokens and the plain loop wrote different ids")
                return 1
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        peer_s, ours_s, one_s = (statistics.median(t) for t in (t_peer, t_ours, t_one))
        print(f"corpus {corpus.stat().st_size / 2**20:.1f} MiB JSONL, {n_peer:,} tokens (BPE, 8192 ids); {cpus} CPUs; "
              f"median of {args.repeat}; identical ids")
        print(f"plain one-process loop                    {peer_s:6.2f} s  {n_peer / peer_s:>11,.0f} tokens/s  1.00x")
        print(f"launch data tokens --workers 1            {one_s:6.2f} s  {n_ours / one_s:>11,.0f} tokens/s  {peer_s / one_s:.2f}x")
        ratio = peer_s / ours_s
        print(f"launch data tokens --workers {args.workers:<2}           {ours_s:6.2f} s  {n_ours / ours_s:>11,.0f} tokens/s  "
              f"{ratio:.2f}x ({'meets' if ratio >= 1.6 else 'BELOW'} the 1.6x target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
