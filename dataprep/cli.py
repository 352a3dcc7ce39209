"""``launch data sft|tokens``: the data tools, run on this machine (they need no GPU and no torch).

Each tool is ``main(argv) -> exit code``; bad input raises launcher.errors.UserError (one line naming
the file, line and field; exit 2) and leaves nothing half-written.
"""

from __future__ import annotations

from launcher.errors import UserError

TOOLS = {"sft": "raw records (JSONL, JSON, CSV, Parquet, a datasets directory) -> training/validation/test.jsonl",
         "tokens": "text or JSONL -> the memory-mapped token file pretraining reads"}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: launch data {sft,tokens} ...\n\n" + "\n".join(f"  {k:8s} {v}" for k, v in TOOLS.items())
              + "\n\nEach has --help, e.g. launch data sft --help")
        return 0 if argv else 2
    tool, rest = argv[0], argv[1:]
    if tool == "sft":
        from dataprep.sft import main as run
    elif tool == "tokens":
        from dataprep.tokens import main as run
    else:
        raise UserError(f"unknown data tool {tool!r}; use one of {', '.join(TOOLS)}", "launch data")
    return run(rest)
