"""Which checkpoint a run resumes from, and whether it can (torch-free: the launcher checks this before
queueing, the trainer again before training). A checkpoint's ``trainer.json`` records the model/PEFT
fingerprint and the layout it was written with."""

from __future__ import annotations

import json
import re
from pathlib import Path

STEP_DIR = re.compile(r"^step-(\d{8})$")  # a complete checkpoint (writers use step-N.partial)
RESUMABLE_CHANGES = ("dp", "ep", "edp")  # DCP reshards these; the rest must match


class ResumeRefused(RuntimeError):
    """The checkpoint cannot continue with this recipe or layout."""


def latest(save_dir: Path) -> Path | None:
    """The newest complete checkpoint (``step-XXXXXXXX`` with its trainer.json), if any."""
    if not save_dir.is_dir():
        return None
    steps = sorted(p for p in save_dir.iterdir() if STEP_DIR.match(p.name) and (p / "trainer.json").exists())
    return steps[-1] if steps else None


def check_compatible(saved: dict, current: dict) -> None:
    if saved.get("fingerprint") != current["fingerprint"]:
        raise ResumeRefused("the checkpoint was written for another model or PEFT configuration "
                            f"(fingerprint {saved.get('fingerprint')} vs {current['fingerprint']}); use a new checkpoint.save_dir")
    for dim in ("tp", "pp", "vpp", "cp", "etp"):
        if saved["layout"].get(dim, 1) != current["layout"].get(dim, 1):
            raise ResumeRefused(f"the checkpoint was written with {dim.upper()}={saved['layout'].get(dim)}, this layout has "
                                f"{dim.upper()}={current['layout'].get(dim)}; only {', '.join(d.upper() for d in RESUMABLE_CHANGES)} may change on resume")


def check_save_dir(save_dir: Path, current: dict) -> Path | None:
    """The checkpoint a launch would resume from, after checking it can; None if there is none."""
    found = latest(save_dir)
    if found is not None:
        check_compatible(json.loads((found / "trainer.json").read_text()), current)
    return found
