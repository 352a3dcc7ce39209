"""Per-step metrics: a console line with a progress bar, elapsed time and ETA (rank 0), ``metrics.jsonl`` in
the run directory, TensorBoard event files under ``tensorboard/`` when the tensorboard package is installed,
and at the end of each attempt a summary (console and ``summary.json``)."""

from __future__ import annotations

import json
import resource
import sys
import time
from collections import deque
from pathlib import Path

import torch


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB (process peak RSS)


def static_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds for parameters, gradients and optimizer states (local shards of DTensors):
    what the planner's weights/grads/optimizer items estimate. Call after a step, before zero_grad."""
    def local(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = list(model.parameters())
    return {"weights": sum(local(p) for p in params),
            "grads": sum(local(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(local(v) for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor))}


def clock(seconds: float) -> str:
    """1:02:03, 2:03 or 0:07."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class MetricsLogger:
    def __init__(self, run_dir: Path, max_steps: int, enabled: bool, tokens_per_step: int = 0, trackers=None):
        self.enabled = enabled
        self.trackers = trackers  # trackers.Trackers on rank 0 (W&B, MLflow), or None
        self.max_steps = max_steps
        self.run_dir = run_dir
        self.tokens_per_step = tokens_per_step
        self.t0 = time.perf_counter()
        self.recent = deque(maxlen=20)  # the last steps' seconds, for the ETA
        self.first: dict | None = None  # this attempt's first and last records
        self.last: dict | None = None
        self.best_val: float | None = None
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        self._tb_ready = False
        self._purge_step: int | None = None

    def rewind(self, step: int) -> int:
        """Resuming at ``step``: the steps after it will be trained again, so their records (written
        after the checkpoint, before a crash) move from metrics.jsonl to metrics.rewound.jsonl and
        TensorBoard purges its events after ``step``; each step then appears once. Returns how many
        records moved."""
        if not self.enabled:
            return 0
        self._purge_step = step + 1
        path = self.run_dir / "metrics.jsonl"
        keep, moved = [], []
        for line in path.read_text().splitlines(keepends=True):
            try:
                (keep if json.loads(line)["step"] <= step else moved).append(line)
            except (ValueError, KeyError, TypeError):
                keep.append(line)  # not ours to judge
        if moved:
            with open(self.run_dir / "metrics.rewound.jsonl", "a") as f:
                f.writelines(moved)
            self.file.close()  # it appends to the file being replaced
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(keep))
            tmp.replace(path)
            self.file = open(path, "a")
        return len(moved)

    def _tensorboard(self):
        if not self._tb_ready:
            self._tb_ready = True
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self._purge_step)
            except ImportError:  # tensorboard is optional
                self.tb = None
        return self.tb

    def log(self, step: int, metrics: dict, console: bool) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        tb = self._tensorboard()
        if tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    tb.add_scalar(f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}", v, step)
        if self.trackers is not None:
            self.trackers.log(step, record)
        self.first = self.first or record
        self.last = record
        if "val_loss" in metrics:
            self.best_val = min(self.best_val if self.best_val is not None else float("inf"), metrics["val_loss"])
        if "step_seconds" in metrics and self.first is not record:  # the first step includes warm-up
            self.recent.append(metrics["step_seconds"])
        if console:
            done = step / self.max_steps
            bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
            eta = f", eta {clock(sum(self.recent) / len(self.recent) * (self.max_steps - step))}" if self.recent and step < self.max_steps else ""
            val = f" val_loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
            print(f"step {step:>6}/{self.max_steps} [{bar}] loss {metrics['loss']:.4f}{val} grad_norm {metrics['grad_norm']:.3f} "
                  f"lr {metrics['lr']:.2e} tok/s {metrics['tokens_per_s']:,.0f} mfu {metrics['mfu']:.2%} "
                  f"imbalance {metrics.get('expert_imbalance', 0):.2f} mem {metrics['mem_gib']:.2f}G "
                  f"{clock(time.perf_counter() - self.t0)}{eta}", flush=True)

    def summary(self, state: str, step: int, checkpoint: Path | None) -> dict:
        """End of an attempt (done, or stopped by a signal): one line on the console and ``summary.json``."""
        if not self.enabled:
            return {}
        wall = time.perf_counter() - self.t0
        first, last = self.first or {}, self.last or {}
        steps = step - first.get("step", step + 1) + 1 if first else 0
        out = {"state": state, "step": step, "max_steps": self.max_steps, "steps_this_attempt": steps,
               "wall_seconds": round(wall, 2), "tokens_this_attempt": steps * self.tokens_per_step,
               "tokens_per_s": round(steps * self.tokens_per_step / wall, 1) if wall > 0 else None,
               "first_loss": first.get("loss"), "loss": last.get("loss"), "val_loss": last.get("val_loss"),
               "best_val_loss": self.best_val, "checkpoint": str(checkpoint) if checkpoint else None, "metrics": "metrics.jsonl"}
        (self.run_dir / "summary.json").write_text(json.dumps(out, indent=2) + "\n")
        losses = f"loss {out['first_loss']:.4f} -> {out['loss']:.4f}" if out["loss"] is not None else "no step logged"
        val = f", val loss {out['val_loss']:.4f}" if out["val_loss"] is not None else ""
        print(f"moe-launch: {state}: step {step}/{self.max_steps}, {steps} step(s) in {clock(wall)}, {losses}{val}, "
              f"{out['tokens_this_attempt']:,} tokens ({out['tokens_per_s'] or 0:,.0f}/s); checkpoint {checkpoint or 'none'}; "
              f"{self.run_dir / 'summary.json'}", flush=True)
        self._report()
        return out

    def _report(self) -> None:
        """The run's report: written here when a tracker takes its figures as artifacts, else one command away."""
        if self.trackers is None or not self.trackers.active:
            print(f"moe-launch: report: launch report {self.run_dir}", flush=True)
            return
        try:
            from report.main import run_report

            page = run_report(self.run_dir)
        except Exception as exc:  # noqa: BLE001 - the report is a view; the run has succeeded or stopped already
            print(f"moe-launch: warning: no report for the trackers ({type(exc).__name__}: {exc})", flush=True)
            return
        self.trackers.artifacts(page.parent)
        print(f"moe-launch: report: {page}", flush=True)

    def info(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.finish()
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
