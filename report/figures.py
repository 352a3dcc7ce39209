"""The report's figures (matplotlib, Agg: no display), each drawn from report.data's numbers only."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FIGSIZE = (7.5, 3.4)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


CURVES: dict[str, list[str]] = {}  # figure path -> the labels of the curves drawn in it (data.json keeps them)


def _save(fig, path: Path, tight: bool = True) -> Path:
    CURVES[str(path)] = [ln.get_label() for ax in fig.axes for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _lines(ax, curves: list[tuple[str, dict, str]], ylabel: str, log: bool = False) -> None:
    """curves: (label, {"step": [...], key: [...]}, key)."""
    for label, s, key in curves:
        if s["step"]:
            ax.plot(s["step"], s[key], label=label, marker="o" if len(s["step"]) < 3 else None, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def loss_figure(runs: list[dict], path: Path) -> Path:
    """Train loss (and validation loss where recorded) per run; the learning rate on a second axis for one run."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    many = len(runs) > 1
    for d in runs:
        tag = f"{d['label']}: " if many else ""
        _lines(ax, [(f"{tag}train", d["scalars"]["loss"], "loss")], "loss")
        if d["val_loss"]["step"]:
            ax.plot(d["val_loss"]["step"], d["val_loss"]["val_loss"], "s--", ms=4, label=f"{tag}validation")
    if not many and runs and runs[0]["scalars"]["lr"]["step"]:
        lr = ax.twinx()
        s = runs[0]["scalars"]["lr"]
        lr.plot(s["step"], s["lr"], color="0.6", lw=1, label="lr")
        lr.set_ylabel("learning rate", color="0.4")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("loss" + (" and learning rate" if not many else ""))
    return _save(fig, path)


def scalar_figure(runs: list[dict], key: str, ylabel: str, title: str, path: Path, log: bool = False) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    _lines(ax, [(d["label"], d["scalars"][key], key) for d in runs], ylabel, log)
    if len(runs) > 1:
        ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def throughput_figure(runs: list[dict], path: Path) -> Path:
    """Tokens/s per run, MFU on a second axis (MFU = tokens/s x FLOPs per token / world / peak)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    _lines(ax, [(d["label"], d["scalars"]["tokens_per_s"], "tokens_per_s") for d in runs], "tokens/s")
    mfu = ax.twinx()
    for d in runs:
        s = d["scalars"]["mfu"]
        mfu.plot(s["step"], [100 * v for v in s["mfu"]], ls=":", lw=1, label=f"{d['label']}: MFU")
    mfu.set_ylabel("MFU % (dotted)")
    if len(runs) > 1:
        ax.legend(fontsize=8)
    ax.set_title("throughput")
    return _save(fig, path)


def memory_figure(mem: dict, path: Path) -> Path:
    """Each rank's measured peak next to the plan's estimate for its pipeline rank."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    x = np.arange(len(mem["rank"]))
    ax.bar(x - 0.2, mem["measured_gib"], 0.4, label="measured peak")
    if any(v is not None for v in mem["plan_gib"]):
        ax.bar(x + 0.2, [v or 0 for v in mem["plan_gib"]], 0.4, label="plan estimate")
    ax.set_xticks(x, [f"{r}\npp{p}" for r, p in zip(mem["rank"], mem["pp_rank"])], fontsize=7)
    ax.set_xlabel("rank")
    ax.set_ylabel("GiB")
    ax.legend(fontsize=8)
    ax.set_title(f"peak memory per rank vs plan (at step {mem['at_step']})")
    return _save(fig, path)


def relative_load(load: np.ndarray) -> np.ndarray:
    """Load / the layer's mean load per expert (1 = balanced), per record and layer."""
    mean = load.mean(axis=-1, keepdims=True)
    return load / np.where(mean > 0, mean, 1)


def expert_heatmap_figure(el: dict, path: Path) -> Path:
    """One panel per MoE layer: experts (rows) x recorded steps (columns), colour = load / mean load."""
    plt = _plt()
    load = np.asarray(el["load"], dtype=np.float64)  # [records, layers, experts]
    rel = relative_load(load)
    n = len(el["layers"])
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 1.2, 2.3 * rows + 0.7), squeeze=False, layout="constrained")
    vmax = max(2.0, float(np.percentile(rel, 99))) if rel.size else 2.0
    im = None
    for i, layer in enumerate(el["layers"]):
        ax = axes[i // cols][i % cols]
        im = ax.imshow(rel[:, i, :].T, aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest",
                       extent=(el["steps"][0] - 0.5, el["steps"][-1] + 0.5, el["experts"] - 0.5, -0.5) if len(el["steps"]) > 1 else None)
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.tick_params(labelsize=6)
        if i % cols == 0:
            ax.set_ylabel("expert", fontsize=7)
        if i // cols == rows - 1:
            ax.set_xlabel("step", fontsize=7)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8, label="load / mean")
    fig.suptitle("expert load over steps (1 = balanced; a bright row that stays is a hot expert, a dark one a dead expert)",
                 fontsize=9)
    return _save(fig, path, tight=False)


def expert_final_figure(el: dict, path: Path) -> Path:
    """The last record: load / mean per layer x expert, and the correction bias."""
    plt = _plt()
    load = np.asarray(el["load"][-1], dtype=np.float64)
    bias = np.asarray(el["bias"][-1], dtype=np.float64)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 0.35 * len(el["layers"]) + 1.8))
    im = a.imshow(relative_load(load), aspect="auto", cmap="magma", vmin=0, interpolation="nearest")
    a.set_yticks(range(len(el["layers"])), [str(x) for x in el["layers"]], fontsize=6)
    a.set_xlabel("expert")
    a.set_ylabel("layer")
    a.set_title(f"load / mean at step {el['steps'][-1]}", fontsize=9)
    fig.colorbar(im, ax=a)
    lim = float(np.abs(bias).max()) or 1.0
    im = b.imshow(bias, aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim, interpolation="nearest")
    b.set_yticks(range(len(el["layers"])), [str(x) for x in el["layers"]], fontsize=6)
    b.set_xlabel("expert")
    b.set_title("correction bias", fontsize=9)
    fig.colorbar(im, ax=b)
    return _save(fig, path)


def run_figures(d: dict, out: Path) -> dict[str, str]:
    """Every figure of one run that has its numbers; {name: file name}."""
    runs = [{**d, "label": d["name"]}]
    figs = {}
    if d["scalars"]["loss"]["step"]:
        figs["loss"] = loss_figure(runs, out / "loss.png").name
        figs["grad_norm"] = scalar_figure(runs, "grad_norm", "grad norm", "gradient norm (before clipping)", out / "grad_norm.png", log=True).name
        figs["throughput"] = throughput_figure(runs, out / "throughput.png").name
    if d["memory"]:
        figs["memory"] = memory_figure(d["memory"], out / "memory.png").name
    if d["expert_load"]:
        figs["expert_load"] = expert_heatmap_figure(d["expert_load"], out / "expert_load.png").name
        figs["expert_final"] = expert_final_figure(d["expert_load"], out / "expert_final.png").name
    return figs


def sweep_figures(runs: list[dict], out: Path) -> dict[str, str]:
    """Overlays: one curve per run."""
    return {"loss": loss_figure(runs, out / "loss.png").name,
            "throughput": throughput_figure(runs, out / "throughput.png").name,
            "grad_norm": scalar_figure(runs, "grad_norm", "grad norm", "gradient norm", out / "grad_norm.png", log=True).name}
