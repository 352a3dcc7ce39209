"""AN EXAMPLE backtest: replace it with your own. It shows the contract of the pipeline's last stage:
read the eval stage's results.csv, write your scored output.

    python examples/backtest_example.py RESULTS_CSV --out SCORED_CSV

results.csv has one row per test example: id, input, reference, prediction, exact_match, f1,
prompt_tokens, answer_tokens, finish, then the dataset's metadata columns. This example "trades" on
each answer: a correct prediction earns +1, a wrong one -1 (a stand-in for a strategy's P&L), adds the
running total, and prints the hit rate per value of a metadata column (``category`` when present).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="An example backtest over an eval results.csv (replace with your own).")
    p.add_argument("results", type=Path, help="results.csv written by `launch eval`")
    p.add_argument("--out", type=Path, required=True, help="scored CSV to write (must not exist)")
    p.add_argument("--group-by", default="category", help="metadata column to report hit rates by (default category)")
    args = p.parse_args(argv)
    if not args.results.is_file():
        print(f"backtest_example: error: {args.results}: no such file", file=sys.stderr)
        return 2
    if args.out.exists():
        print(f"backtest_example: error: {args.out} exists; not overwriting", file=sys.stderr)
        return 2
    with open(args.results, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    total, groups = 0, defaultdict(lambda: [0, 0])
    for row in rows:
        pnl = 1 if row["exact_match"] == "1" else -1
        total += pnl
        row["pnl"], row["cumulative_pnl"] = pnl, total
        g = groups[row.get(args.group_by, "")]
        g[0] += pnl > 0
        g[1] += 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".partial")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=[*(rows[0].keys() if rows else ["id"]), *([] if rows else ["pnl", "cumulative_pnl"])])
        w.writeheader()
        w.writerows(rows)
    tmp.rename(args.out)
    print(f"backtest_example: {len(rows)} examples, total P&L {total:+d}, hit rate "
          f"{sum(g[0] for g in groups.values()) / max(len(rows), 1):.3f} -> {args.out}")
    for key, (hits, n) in sorted(groups.items()):
        print(f"  {args.group_by}={key or '-'}: {hits}/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
