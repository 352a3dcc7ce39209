"""What a run's report shows, read from its run directory (torch-free; a running job's files as they are).

Every figure is drawn from these numbers, and ``report/data.json`` keeps them, so a report can be checked
against metrics.jsonl and the expert-load records without reading pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from report.expert_load import read_expert_load

SCALARS = ("loss", "grad_norm", "lr", "tokens_per_s", "mfu", "expert_imbalance", "mem_gib", "step_seconds")


def read_metrics(run: Path) -> list[dict]:
    """metrics.jsonl's records, in order; a half-written last line (a running job) is skipped."""
    path = run / "metrics.jsonl"
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _yaml(path: Path) -> dict:
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except ValueError:  # being rewritten
        return {}


def series(records: list[dict], key: str) -> dict:
    """{"step": [...], key: [...]}: the records that have ``key``."""
    have = [r for r in records if r.get(key) is not None]
    return {"step": [r["step"] for r in have], key: [r[key] for r in have]}


def memory_series(run: Path, plan: dict) -> dict | None:
    """Each rank's measured peak (memory.json, gathered by the trainer) next to the plan's estimate for its
    pipeline rank (plan.yaml), in GiB."""
    mem = _json(run / "memory.json")
    peaks, ranks = mem.get("peak_gib"), mem.get("ranks")
    planned = plan.get("memory", {}).get("total_per_pp_rank_gib")
    if not peaks or not ranks:
        return None
    pp_of = {r["rank"]: r.get("pp_rank", 0) for r in ranks}
    return {"rank": list(range(len(peaks))), "measured_gib": peaks, "pp_rank": [pp_of.get(i, 0) for i in range(len(peaks))],
            "plan_gib": [planned[pp_of.get(i, 0)] if planned else None for i in range(len(peaks))],
            "at_step": mem.get("peak_step"), "unit": "GiB of GPU memory (CPU: process peak RSS)"}


def expert_load_series(run: Path) -> dict | None:
    load = read_expert_load(run)
    if load is None:
        return None
    totals = load.load.sum(axis=2)  # [records, layers]: tokens routed per layer per record
    return {"layers": load.layers, "steps": load.steps.tolist(), "steps_covered": load.covered.tolist(),
            "experts": int(load.load.shape[2]), "load": load.load.tolist(), "bias": load.bias.tolist(),
            "routed_per_record_layer": totals.tolist()}


def run_data(run: Path) -> dict:
    """Everything one run's report shows."""
    run = Path(run)
    recipe, plan, meta = _yaml(run / "recipe.yaml"), _yaml(run / "plan.yaml"), _yaml(run / "meta.yaml")
    records = read_metrics(run)
    summary = _json(run / "summary.json")
    last = records[-1] if records else {}
    state = summary.get("state") if summary and summary.get("step") == last.get("step") else ("running" if records else "not started")
    return {
        "run": str(run), "name": run.name, "recipe": recipe.get("name"), "model": recipe.get("model", {}).get("name"),
        "state": state, "max_steps": recipe.get("train", {}).get("max_steps"), "last": last,
        "layout": plan.get("layout"), "cluster": plan.get("cluster"), "plan_memory": plan.get("memory", {}),
        "plan_compute": plan.get("compute", {}), "warnings": plan.get("warnings", []), "meta": meta,
        "scalars": {k: series(records, k) for k in SCALARS},
        "val_loss": series(records, "val_loss"),
        "memory": memory_series(run, plan),
        "expert_load": expert_load_series(run),
    }
