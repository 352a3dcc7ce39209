"""Render the job script from the Jinja templates in ``templates/sbatch/``.

Safety by construction: the environment's ``finalize`` refuses any string that was not passed
through ``q`` (shell-quoted) or ``sbatch`` (checked against a safe character set for ``#SBATCH``
lines, which sbatch parses itself). Integers pass as they are. A template that interpolates a raw
string fails to render instead of producing an injectable script.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from functools import lru_cache

import jinja2

from launcher import paths
from launcher.cluster import ClusterProfile, check_sbatch_value, check_slurm_fields
from launcher.layout import Layout
from launcher.recipe import Recipe

REQUEUE_EXIT_CODE = 75  # the trainer exits with this after checkpointing on SIGUSR2: "requeue me"
# The module torchrun starts on every rank, per backend.
ENTRY_MODULES = {"native": "trainer.main", "nemo": "nemo_backend.main"}


class Shell(str):
    """A string already made safe for the place it is interpolated."""


def _q(value: object) -> Shell:
    return Shell(shlex.quote(str(value)))


def _sbatch_value(value: object, field: str = "value") -> Shell:
    return Shell(check_sbatch_value(value, field))


def _finalize(value: object) -> object:
    if isinstance(value, Shell) or value is None:
        return "" if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise jinja2.TemplateError(f"unquoted value {value!r} in template: pipe it through |q or |sbatch")
    return value


def _bytecode_cache() -> jinja2.BytecodeCache | None:
    """Compiled templates under $XDG_CACHE_HOME/moe-launch/jinja: compiling them is a third of a dry run's
    own work. Keyed by Jinja on the template's source, so an edited template recompiles."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    directory = os.path.join(root, "moe-launch", "jinja")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return None  # a read-only home: compile every time
    return jinja2.FileSystemBytecodeCache(directory)


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(paths.data_dir("templates") / "sbatch")),
        bytecode_cache=_bytecode_cache(),
        undefined=jinja2.StrictUndefined,
        finalize=_finalize,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["q"] = _q
    env.filters["sbatch"] = _sbatch_value
    env.filters["raw"] = Shell  # only for template-author constants and validated shell code (setup lines)
    return env


@dataclass(frozen=True)
class RenderInput:
    recipe: Recipe
    profile: ClusterProfile
    layout: Layout
    run_dir: str
    python: str | None = None  # interpreter on the nodes; default: the profile's, else this one
    entry_module: str | None = None  # what torchrun starts on every rank; default: the recipe backend's trainer
    job_name: str | None = None  # Slurm job name; default: the recipe's name
    what: str = "recipe"  # the script's first line: "moe-launch job: <what> <job_name> on cluster ..."


def python_on_nodes(profile: ClusterProfile, image: str | None) -> str:
    """The interpreter a job runs: the profile's; else, on Slurm, a container's own ``python``; else this one (the
    local executor runs where ``launch`` runs, e.g. inside NeMo's container)."""
    if profile.python:
        return profile.python
    return "python" if image and profile.executor == "slurm" else sys.executable


def container_mounts(profile: ClusterProfile, run_dir: str) -> list[str]:
    """pyxis mounts of a container job: the runs directory holding its run directory, at its own path (the job's
    inputs, outputs and the snapshot of moe-launch's code under ``code/``; the earlier stages of a pipeline and
    the run an export or eval reads live there too), then the profile's."""
    runs = os.path.dirname(os.path.abspath(run_dir))
    return [f"{runs}:{runs}", *profile.container.mounts]


def render(inp: RenderInput) -> str:
    """The job script: ``job.sbatch`` for Slurm profiles, ``job.sh`` for the local executor."""
    image = inp.recipe.backend.container_image or inp.profile.container.image
    if inp.profile.executor == "slurm":
        check_slurm_fields(inp.profile, f"cluster {inp.profile.name}: ")
        check_sbatch_value(inp.run_dir, "run directory (it goes into #SBATCH --output)")
    template = "job.sbatch.j2" if inp.profile.executor == "slurm" else "local.sh.j2"
    return environment().get_template(template).render(
        recipe=inp.recipe,
        profile=inp.profile,
        slurm=inp.profile.slurm,
        layout=inp.layout,
        run_dir=inp.run_dir,
        python=inp.python or python_on_nodes(inp.profile, image),
        image=image,
        mounts=container_mounts(inp.profile, inp.run_dir),
        entry_module=inp.entry_module or ENTRY_MODULES[inp.recipe.backend.name],
        job_name=inp.job_name or inp.recipe.name,
        what=Shell(inp.what),
        env=sorted({**inp.profile.env, **inp.recipe.env}.items()),
        requeue_exit=REQUEUE_EXIT_CODE,
    )
