"""Pipelines: stages (e.g. convert -> train -> eval) that run one after another as dependent jobs.

A pipeline file (``recipes/*_pipeline.py``) defines ``pipeline() -> Pipeline``. Each stage is a
training recipe (rendered as a normal training job), a job on a trained model (``task="eval"``,
``"export"`` or ``"generate"`` with the options of ``launch eval|export|generate`` as ``args``, the
run being an earlier stage: ``args=["{train}", "--split", "test"]``), or a command run once on one node. On Slurm
every stage is its own job with ``--dependency=afterok:<previous>`` and ``--kill-on-invalid-dep=yes``:
a failed stage makes Slurm cancel the rest instead of leaving them pending forever. Each stage gets
its own run directory, so ``launch status|logs|cancel|list`` work on stages as on any run.

Stage commands and overrides may name other stages' run directories as ``{stage_name}`` (and
``{python}``, the interpreter on the nodes); literal braces are written ``{{`` and ``}}``.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import List, Optional

from launcher.errors import UserError

TASKS = ("export", "generate", "eval")  # jobs on a trained model (launcher.tasks); not imported here: it is big

STAGE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")


@dataclass
class Stage:
    name: str
    recipe: Optional[str] = None  # a training stage: recipe file or shipped name ...
    overrides: List[str] = field(default_factory=list)  # ... with these key=value overrides
    command: Optional[List[str]] = None  # or a command stage: argv, run once on one node
    task: Optional[str] = None  # or a job on a trained model: export | generate | eval ...
    args: List[str] = field(default_factory=list)  # ... with the command's arguments (the run first)
    gpus: int = 0  # GPUs a command stage asks for (cuda profiles)
    time: Optional[str] = None  # a command stage's time limit (default: the profile's)
    container_image: Optional[str] = None  # a command stage's container (default: the profile's), e.g. NeMo's


@dataclass
class Pipeline:
    name: str
    stages: List[Stage] = field(default_factory=list)


def check(p: Pipeline, where: str) -> None:
    """Structure errors, one line naming the stage and field."""
    from launcher.validate import SAFE_NAME, SAFE_NAME_RULE

    if not isinstance(p.name, str) or not SAFE_NAME.fullmatch(p.name):
        raise UserError(f"{p.name!r} is not valid; {SAFE_NAME_RULE} (it names the run directories)", f"{where}: name")
    if not p.stages:
        raise UserError("a pipeline needs at least one stage", f"{where}: stages")
    seen: set[str] = set()
    for i, s in enumerate(p.stages):
        at = f"{where}: stages[{i}]"
        if not isinstance(s, Stage):
            raise UserError(f"is a {type(s).__name__}, expected launcher.pipeline.Stage", at)
        if not STAGE_NAME.fullmatch(s.name) or s.name == "python":
            raise UserError(f"stage name {s.name!r} is not valid; use a letter, then letters, digits, '_' or '-' (not 'python')", f"{at}.name")
        if s.name in seen:
            raise UserError(f"two stages are named {s.name!r}; stage names must be unique", f"{at}.name")
        seen.add(s.name)
        if sum(x is not None for x in (s.recipe, s.command, s.task)) != 1:
            raise UserError("give a stage either recipe= (a training job), task= (export, generate or eval of a run) "
                            "or command= (argv run once)", at)
        if s.task is not None and s.task not in TASKS:
            raise UserError(f"task {s.task!r} is not one of {', '.join(TASKS)}", f"{at}.task")
        if s.task is not None and (not s.args or not all(isinstance(a, str) for a in s.args)):
            raise UserError("a task stage needs args: the run first (e.g. \"{train}\"), then options", f"{at}.args")
        if s.command is not None and (not s.command or not all(isinstance(a, str) for a in s.command)):
            raise UserError("command must be a non-empty list of strings (argv)", f"{at}.command")
        if s.gpus < 0:
            raise UserError(f"must be >= 0, got {s.gpus}", f"{at}.gpus")
        if s.container_image is not None and s.command is None:
            raise UserError("container_image is for command stages; a training stage takes backend.container_image "
                            "as an override, a task stage runs where its run's backend runs", f"{at}.container_image")


def placeholders(text: str, values: dict[str, str], field_name: str) -> str:
    """Fill ``{stage}`` / ``{python}`` in one argument or override."""
    try:
        names = {n for _, n, _, _ in string.Formatter().parse(text) if n is not None}
    except ValueError as exc:
        raise UserError(f"{text!r}: {exc} (write literal braces as {{{{ and }}}})", field_name) from None
    unknown = sorted(n for n in names if n not in values)
    if unknown:
        raise UserError(f"{text!r} names {', '.join('{' + n + '}' for n in unknown)}; known: "
                        f"{', '.join('{' + k + '}' for k in values)}", field_name)
    return text.format_map(values)
