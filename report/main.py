"""`launch report`: a self-contained HTML page and PNG figures of a run, a sweep or a pipeline.

  one run        RUN/report/: index.html (figures inlined), loss.png, grad_norm.png, throughput.png,
                 memory.png, expert_load.png, expert_final.png, data.json (the numbers behind each)
  several runs   one page overlaying their curves (a sweep), linking each run's own report
  a pipeline     one page linking its stages: the training report, the evaluation summary and the head
                 of results.csv, where the model was exported

Works on a running job (it reads what exists) and a finished one; torch-free.
"""

from __future__ import annotations

import base64
import csv
import datetime
import json
import os
from pathlib import Path

import jinja2

from report.data import run_data

RUN_CAPTIONS = [("loss", "Loss and learning rate"), ("grad_norm", "Gradient norm"), ("throughput", "Tokens/s and MFU"),
                ("memory", "Peak memory per rank vs the plan"), ("expert_load", "Expert load per layer over steps"),
                ("expert_final", "Final expert load and correction bias")]
SWEEP_CAPTIONS = [("loss", "Loss"), ("throughput", "Tokens/s and MFU"), ("grad_norm", "Gradient norm")]
PAGE = "index.html"


def _env() -> jinja2.Environment:
    from launcher import paths

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(paths.data_dir("templates") / "report")),
                              autoescape=True, undefined=jinja2.StrictUndefined)


def _inline(out: Path, figures: dict[str, str]) -> dict[str, str]:
    """data: URIs, so that index.html alone shows everything (mailed, copied off the cluster)."""
    return {k: "data:image/png;base64," + base64.b64encode((out / v).read_bytes()).decode() for k, v in figures.items()}


def _now() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def _write(out: Path, template: str, data: dict, **context) -> Path:
    from report.figures import CURVES

    figures = data.get("figures") or {}
    data = {**data, "curves": {k: CURVES.get(str(out / v), []) for k, v in figures.items()}}
    (out / "data.json").write_text(json.dumps(data, indent=1) + "\n")
    page = out / PAGE
    page.write_text(_env().get_template(template).render(written=_now(), **context))
    return page


def run_report(run: Path, out: Path | None = None, d: dict | None = None) -> Path:
    """One run's report; returns the page. ``d``: the run's :func:`run_data`, when the caller has read it."""
    from report.figures import run_figures

    d = d or run_data(run)
    out = Path(out or Path(run) / "report")
    out.mkdir(parents=True, exist_ok=True)
    figures = run_figures(d, out)
    return _write(out, "single.html.j2", {"figures": figures, **d}, d=d, figures=figures,
                  images=_inline(out, figures), captions=RUN_CAPTIONS, title=f"{d['name']}: report")


def _overrides(run: Path) -> list[str]:
    """The key=value overrides of the command that launched ``run`` (meta.yaml)."""
    import re
    import shlex

    import yaml

    meta = (yaml.safe_load((run / "meta.yaml").read_text()) or {}) if (run / "meta.yaml").exists() else {}
    try:
        words = shlex.split(str(meta.get("command", "")))
    except ValueError:
        return []
    return [w for w in words if re.match(r"^[A-Za-z_][\w.]*=", w)]


def _label(run: Path, runs: list[Path]) -> str:
    """A sweep point's overrides where they tell the runs apart, else its name."""
    common = set.intersection(*(set(_overrides(r)) for r in runs))
    return " ".join(o for o in _overrides(run) if o not in common) or run.name


def sweep_report(runs: list[Path], out: Path) -> Path:
    """Several runs overlaid (each also gets its own report, linked)."""
    from report.figures import sweep_figures

    out.mkdir(parents=True, exist_ok=True)
    data = []
    for run in runs:
        d = run_data(run)
        page = run_report(run, d=d)
        d["label"], d["link"] = _label(run, runs), os.path.relpath(page, out)
        data.append(d)
    figures = sweep_figures(data, out)
    title = f"{len(runs)} runs"
    return _write(out, "sweep.html.j2", {"runs": data, "figures": figures}, runs=data, figures=figures,
                  images=_inline(out, figures), captions=SWEEP_CAPTIONS, title=title)


def _evals(run: Path) -> list[dict]:
    out = []
    for csv_path in sorted(run.rglob("results.csv")):
        summary_path = csv_path.with_name("summary.json")
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        with open(csv_path, newline="", encoding="utf-8") as f:
            head = [row for _, row in zip(range(6), csv.reader(f))]
        out.append({"csv": str(csv_path), "summary": {k: v for k, v in summary.items() if not isinstance(v, (dict, list))},
                    "head": head or [[]]})
    return out


def _exports(run: Path) -> list[str]:
    return sorted(str(p.parent) for p in run.rglob("config.json") if any(p.parent.glob("*.safetensors")))


def pipeline_report(name: str, stages: list[Path], states: list[str], out: Path) -> Path:
    """One page for a pipeline launch: each stage, its state, and what it made."""
    from launcher.jobs import pipeline_of

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for run, state in zip(stages, states):
        info = pipeline_of(run) or {}
        row = {"index": info.get("index", "?"), "stage": info.get("stage", run.name), "run": str(run), "state": state,
               "report": None, "last": None, "exports": _exports(run), "evals": _evals(run)}
        if (run / "metrics.jsonl").exists():
            d = run_data(run)
            row["report"], row["last"] = os.path.relpath(run_report(run, d=d), out), d["last"]
        rows.append(row)
    return _write(out, "pipeline.html.j2", {"pipeline": name, "stages": rows}, stages=rows, title=f"pipeline {name}")
