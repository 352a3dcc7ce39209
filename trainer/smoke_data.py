"""The smoke run's SFT data: short arithmetic questions ("What is 37 + 45?" -> "82"), so a falling loss means
the model learns something. Deterministic from a seed; the splits never share a question."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

SMOKE_DIR_NAME = "smoke-arith-v1"


def arithmetic_pair(rng: random.Random) -> tuple[str, str]:
    """One question/answer: an addition or subtraction of numbers below 100, or a product of numbers up to 12."""
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        return f"What is {a} * {b}?", str(a * b)
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"What is {a} - {b}?", str(a - b)
    return f"What is {a} + {b}?", str(a + b)


def smoke_samples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` distinct question/answer pairs (at most the ~15,000 possible questions)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    pairs = []
    attempts = 0
    while len(pairs) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct arithmetic questions")
        q, a = arithmetic_pair(rng)
        if q not in seen:
            seen.add(q)
            pairs.append((q, a))
    return pairs


def write_smoke_dataset(directory: str | Path, n_train: int = 2000, n_val: int = 200, n_test: int = 200, seed: int = 0) -> Path:
    """Write training/validation/test.jsonl (NeMo's ``input``/``output`` format) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pairs = smoke_samples(n_train + n_val + n_test, seed)
    splits = {"training": pairs[:n_train], "validation": pairs[n_train:n_train + n_val], "test": pairs[n_train + n_val:]}
    for name, items in splits.items():
        with open(directory / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for q, a in items:
                f.write(json.dumps({"input": q, "output": a}) + "\n")
    return directory


def ensure_smoke_dataset(cache_dir: str | Path) -> Path:
    """``<cache_dir>/smoke-arith-v1``, written once (temp dir + rename, safe when many ranks race)."""
    cache_dir = Path(cache_dir)
    target = cache_dir / SMOKE_DIR_NAME
    if (target / "training.jsonl").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOKE_DIR_NAME}-", dir=cache_dir))
    try:
        write_smoke_dataset(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "training.jsonl").is_file():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m trainer.smoke_data", description="Write the smoke SFT dataset (arithmetic Q/A).")
    p.add_argument("directory", type=Path, help="where training/validation/test.jsonl go")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = write_smoke_dataset(args.directory, seed=args.seed)
    print(f"moe-launch: smoke dataset written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
