"""One launch = one or more runs: a single recipe, a sweep (``--sweep key=v1,v2``), or a pipeline.

All or nothing, in three passes: every run is checked (preflight) before any is written, every run
directory is written before any job is submitted, and if sbatch refuses one job the jobs already
submitted by this launch are cancelled and its run directories removed. Pipeline stages are
submitted in order, each depending on the previous one (``afterok``, ``--kill-on-invalid-dep=yes``).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from launcher import config_io, provenance, recipe_loader, resume, rundir
from launcher.cluster import ClusterProfile, check_sbatch_value, check_slurm_fields
from launcher.errors import UserError
from launcher.pipeline import Pipeline, Stage, placeholders
from launcher.plan import plan_dict, summary
from launcher.preflight import Preflight, run_preflight
from launcher.recipe import Recipe, fingerprint
from launcher.render import RenderInput, Shell, container_mounts, environment, python_on_nodes, render


@dataclass
class Run:
    """One job of a launch, from planning to submission."""

    label: str  # names the run directory: recipe name, "<recipe>-s<i>" or "<pipeline>.<stage>"
    spec: str = ""  # the recipe as the user named it (for the summary)
    recipe: Recipe | None = None  # training runs
    recipe_path: Path | None = None
    stage: Stage | None = None  # pipeline stages
    overrides: list[str] = field(default_factory=list)
    meta_extra: dict = field(default_factory=dict)
    after_previous: bool = False  # pipeline: start only after the previous run succeeded
    pre: Preflight | None = None
    run_dir: Path | None = None
    script_name: str = ""
    files: dict[str, str] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)  # summary
    job_id: str | None = None
    prepared: object = None  # a task stage: the checked export/generate/eval job (launcher.tasks.Prepared)


def sweep_points(specs: list[str]) -> list[list[str]]:
    """``["a=1,2", "b=x,y"]`` -> the cartesian product as override lists (one run each)."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        vals = values.split(",")
        if not sep or not key or not all(vals):
            raise UserError(f"{spec!r} is not key=v1,v2,...", "--sweep")
        if key in {a[0] for a in axes}:
            raise UserError(f"{key} is swept twice; give all its values in one --sweep", "--sweep")
        axes.append((key, vals))
    return [[f"{k}={v}" for k, v in zip([a[0] for a in axes], combo)] for combo in itertools.product(*[a[1] for a in axes])]


def runs_for_recipe(spec: str | Recipe, overrides: list[str], sweeps: list[str]) -> list[Run]:
    """A recipe named by file or shipped name (or a Recipe object, from the Python API), per sweep point."""
    if isinstance(spec, Recipe):  # built in Python: type-checked like a recipe file's
        base, path, spec = config_io.typed(spec, "recipe: "), Path.cwd(), spec.name
    else:
        base, path = recipe_loader.load_recipe(spec)
    points = sweep_points(sweeps) if sweeps else [[]]
    runs = []
    for i, point in enumerate(points, 1):
        recipe = recipe_loader.apply_overrides(base, [*overrides, *point])
        label = recipe.name if len(points) == 1 else f"{recipe.name}-s{i}"  # safe in paths and #SBATCH lines
        extra = {"sweep": {"index": i, "of": len(points), "overrides": point}} if sweeps else {}
        runs.append(Run(label, spec.partition(":")[0], recipe, path, overrides=[*overrides, *point], meta_extra=extra))
    return runs


def runs_for_pipeline(p: Pipeline, path: Path, overrides: list[str]) -> list[Run]:
    """Stages as runs; ``overrides`` from the command line apply to every training stage."""
    runs = []
    for i, st in enumerate(p.stages):
        extra = {"pipeline": {"name": p.name, "stage": st.name, "index": i + 1, "of": len(p.stages),
                              "stages": [s.name for s in p.stages]}}
        runs.append(Run(f"{p.name}.{st.name}", stage=st, recipe_path=path, overrides=list(overrides),
                        meta_extra=extra, after_previous=i > 0))
    return runs


def plan_runs(runs: list[Run], profile: ClusterProfile, root: Path, memory_check: bool, python: str) -> list[Run]:
    """Name every run directory, then resolve and check every training run. Returns the failed ones."""
    for run in runs:
        run.run_dir = rundir.reserve_name(root, run.label, profile.name)
    taken = [r.run_dir for r in runs]
    if len(set(taken)) != len(taken):
        raise UserError("two runs of this launch would share a run directory name", "RECIPE")
    values = {r.stage.name: str(r.run_dir) for r in runs if r.stage}
    values["python"] = python
    failed = []
    for run in runs:
        st = run.stage
        if st is not None and st.recipe is not None:
            where = f"{run.recipe_path}: stage {st.name}"
            recipe, run.recipe_path = recipe_loader.load_recipe(st.recipe)
            run.spec = st.recipe
            ov = [placeholders(o, values, f"{where}.overrides") for o in [*st.overrides, *run.overrides]]
            run.recipe = recipe_loader.apply_overrides(recipe, ov)
        if run.recipe is not None:
            earlier = tuple(str(r.run_dir) for r in runs[:runs.index(run)] if r.stage)  # written before this one starts
            run.recipe = resume.resolve_load(run.recipe, root, earlier)  # checkpoint.load=RUN[:STEP] -> its checkpoint
            run.pre = run_preflight(run.recipe, profile, memory_check=memory_check, produced=earlier)
            if not run.pre.ok:
                failed.append(run)
        elif st.task is not None:
            from launcher import tasks

            where = f"{run.recipe_path}: stage {st.name}.args"
            args = tasks.parser(st.task, stage=where).parse_args([placeholders(a, values, where) for a in st.args])
            pending = {}  # what the stages before this one will have made
            for r in runs[:runs.index(run)]:
                if r.recipe is not None:
                    pending[os.path.abspath(r.run_dir)] = tasks.Source(r.run_dir, "run", r.recipe, pending=True)
                elif r.prepared is not None and r.prepared.task.kind == "export" and r.prepared.task.out:
                    pending[r.prepared.task.out] = tasks.Source(Path(r.prepared.task.out), "hf", r.prepared.recipe, pending=True)
            run.prepared = tasks.prepare(st.task, args, profile, root, pending)
        else:
            # a copy: the pipeline object is planned again if a run directory name was taken meanwhile
            own = {**values, "python": python_on_nodes(profile, st.container_image or profile.container.image)}
            run.stage = dataclasses.replace(st, command=[placeholders(a, own, f"{run.recipe_path}: stage {st.name}.command")
                                                         for a in st.command])
    return failed


def check_can_run(profile, trains: bool = True) -> None:
    """Before anything is written: is there a way to run this job from here?"""
    if profile.executor == "slurm":
        from launcher import slurm

        slurm.require("sbatch")
    elif trains:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            raise UserError("the local executor runs the native trainer, which needs PyTorch: pip install 'moe-launch[train]'", "--cluster local")
        if importlib.util.find_spec("trainer") is None:
            raise UserError("this install has no job-side trainer package; use --dry-run to check and render only", "--cluster local")


@dataclass
class Launch:
    """One ``launch``: its runs (checked, rendered and written unless some failed) and a sweep's job array."""

    runs: list[Run]
    failed: list[Run]
    pipeline: bool
    array: "SweepArray | None" = None


def prepare_launch(target, overrides: list[str], sweeps: list[str], profile: ClusterProfile, root: Path, argv: list[str],
                   dry_run: bool, memory_check: bool = True, can_run=None) -> Launch:
    """Check every run of a recipe, sweep or pipeline, then render and write their directories (all or none).
    ``target``: a recipe or pipeline spec (file, shipped name) or a Recipe object. ``can_run(profile, trains)``
    raises if nothing could run the jobs from here (called before anything is written)."""
    target_obj, target_path = (target, Path.cwd()) if isinstance(target, Recipe) else recipe_loader.load_target(target)
    pipeline = isinstance(target_obj, Pipeline)
    if pipeline and sweeps:
        raise UserError("--sweep applies to a recipe, not to a pipeline", "--sweep")
    python = python_on_nodes(profile, profile.container.image)
    for _ in range(100):
        runs = (runs_for_pipeline(target_obj, target_path, overrides) if pipeline
                else runs_for_recipe(target if isinstance(target, Recipe) else target, overrides, sweeps))
        failed = plan_runs(runs, profile, root, memory_check, python)
        if failed:
            return Launch(runs, failed, pipeline)
        if not dry_run and can_run is not None:
            can_run(profile, any(r.recipe is not None for r in runs))
        render_runs(runs, profile, argv, dry_run)
        # a sweep on Slurm is one job array (its script in a directory of its own, written with the runs)
        array = render_array(runs, profile, root) if sweeps and len(runs) > 1 and profile.executor == "slurm" else None
        try:
            write_runs(runs)
        except FileExistsError:
            continue
        if array is not None:
            try:
                rundir.create(array.path, array.files)
            except BaseException as exc:
                for run in runs:
                    shutil.rmtree(run.run_dir, ignore_errors=True)
                if isinstance(exc, FileExistsError):
                    continue
                raise
        return Launch(runs, [], pipeline, array)
    raise UserError(f"could not pick free run directory names under {root}", "runs dir")


def render_runs(runs: list[Run], profile: ClusterProfile, argv: list[str], dry_run: bool) -> None:
    for run in runs:
        meta = {**provenance.metadata(argv, run.recipe_path, dry_run), **run.meta_extra}
        if run.recipe is not None:
            plan = plan_dict(run.recipe, profile, run.pre)
            run.script_name = "job.sbatch" if profile.executor == "slurm" else "job.sh"
            script = render(RenderInput(run.recipe, profile, run.pre.layout, str(run.run_dir)))
            run.files = {run.script_name: script, "recipe.yaml": config_io.to_yaml(run.recipe),
                         "cluster.yaml": config_io.to_yaml(profile), "plan.yaml": rundir.dump(plan), "meta.yaml": rundir.dump(meta)}
            run.lines = summary(run.recipe, run.spec, profile, run.pre, plan)
        elif run.prepared is not None:
            from launcher import tasks

            run.script_name, run.files = tasks.render_job(run.prepared, profile, run.run_dir, argv, dry_run,
                                                          python_on_nodes(profile, image_of(run, profile)),
                                                          job_name=run.label, meta_extra=run.meta_extra)
            run.lines = [f"stage    {run.stage.name}: {run.stage.task} {' '.join(run.stage.args)}", *run.prepared.lines]
        else:
            st = run.stage
            run.script_name = "command.sbatch" if profile.executor == "slurm" else "command.sh"
            script = render_command(st, run.label, profile, str(run.run_dir), python_on_nodes(profile, image_of(run, profile)))
            plan = {"cluster": profile.name, "stage": st.name, "command": st.command}
            run.files = {run.script_name: script, "cluster.yaml": config_io.to_yaml(profile), "plan.yaml": rundir.dump(plan),
                         "meta.yaml": rundir.dump(meta)}
            run.lines = [f"stage    {st.name}: {shlex.join(st.command)}"]
        if run.prepared is None and image_of(run, profile) and profile.executor == "slurm":  # (render_job adds its own)
            run.files.update(provenance.code_snapshot())  # the container runs the code that planned the job (PYTHONPATH)


def image_of(run: Run, profile: ClusterProfile) -> str | None:
    """The container a run's job runs in: a training run's backend image, a task's (its run's image, see
    tasks.job_image), a command stage's own; else the profile's."""
    if run.prepared is not None:
        from launcher import tasks

        return tasks.job_image(run.prepared, profile)
    own = run.recipe.backend.container_image if run.recipe is not None else (run.stage.container_image if run.stage else None)
    return own or profile.container.image


def render_command(st: Stage, job_name: str, profile: ClusterProfile, run_dir: str, python: str) -> str:
    image = st.container_image or profile.container.image
    slurm = profile.slurm if profile.executor == "slurm" else None
    if slurm is not None:
        check_slurm_fields(profile, f"cluster {profile.name}: ")
        check_sbatch_value(run_dir, "run directory (it goes into #SBATCH --output)")
        if st.time is not None:
            check_sbatch_value(st.time, f"stage {st.name}.time")
    return environment().get_template("command.sbatch.j2").render(
        stage=st, pipeline=job_name.split(".")[0], job_name=job_name, profile=profile, slurm=slurm, run_dir=run_dir,
        image=image, mounts=container_mounts(profile, run_dir), env=sorted(profile.env.items()),
        command=Shell(shlex.join(st.command)), command_text=shlex.join(st.command),
    )


@dataclass
class SweepArray:
    """A sweep's job array: the directory holding its script (not a run: ``launch list`` does not show it)."""

    path: Path
    files: dict[str, str]


def render_array(runs: list[Run], profile: ClusterProfile, root: Path) -> SweepArray:
    """One Slurm job array for a sweep's runs: task i execs the i-th run's own job.sbatch."""
    recipe = runs[0].recipe
    path = rundir.reserve_name(root, f"{recipe.name}-sweep", profile.name)
    check_sbatch_value(str(path), "sweep directory (it goes into #SBATCH --output)")
    n = len(runs)
    throttle = profile.slurm.array_throttle
    script = environment().get_template("array.sbatch.j2").render(
        profile=profile, slurm=profile.slurm, layout=runs[0].pre.layout, job_name=recipe.name, sweep_dir=str(path),
        run_dirs=[str(r.run_dir) for r in runs], array=f"1-{n}" + (f"%{throttle}" if throttle else ""))
    points = [{"task": i, "run": r.run_dir.name, "overrides": r.meta_extra["sweep"]["overrides"]} for i, r in enumerate(runs, 1)]
    return SweepArray(path, {"array.sbatch": script, "sweep.yaml": rundir.dump({"recipe": recipe.name, "points": points})})


def write_runs(runs: list[Run]) -> None:
    """Create every run directory, or none. FileExistsError: a name was taken meanwhile (by another
    launch in the same second); the caller plans again, which picks free names."""
    made: list[Path] = []
    try:
        for run in runs:
            rundir.create(run.run_dir, run.files)
            made.append(run.run_dir)
    except BaseException:
        for d in made:
            shutil.rmtree(d, ignore_errors=True)
        raise


def submit_runs(runs: list[Run], out) -> None:
    """sbatch each run (pipeline stages chained with afterok); all or nothing."""
    from launcher import jobs, slurm

    done: list[Run] = []
    try:
        for run in runs:
            dep = done[-1].job_id if run.after_previous and done else None
            run.job_id = slurm.submit(run.run_dir / run.script_name, after_ok=dep)
            done.append(run)
    except BaseException:
        for r in done:
            try:
                jobs.cancel(r.job_id)
            except UserError:
                pass
        for r in runs:
            shutil.rmtree(r.run_dir, ignore_errors=True)  # ours, just made: nothing half-submitted stays behind
        raise
    for run in runs:
        sub = {"job_id": run.job_id}
        if run.after_previous:
            sub["after_ok"] = runs[runs.index(run) - 1].job_id
        (run.run_dir / "submission.yaml").write_text(rundir.dump(sub))
        after = f" (after {sub['after_ok']} succeeds)" if run.after_previous else ""
        print(f"submitted job {run.job_id}{after}: {run.run_dir.name}", file=out)


def submit_array(runs: list[Run], array: SweepArray, out) -> None:
    """sbatch the sweep's job array; each run records its task (job id ``<array>_<task>``). All or nothing."""
    from launcher import slurm

    try:
        job = slurm.submit(array.path / "array.sbatch")
    except BaseException:
        for d in [array.path, *(r.run_dir for r in runs)]:
            shutil.rmtree(d, ignore_errors=True)
        raise
    for i, run in enumerate(runs, 1):
        run.job_id = f"{job}_{i}"
        (run.run_dir / "submission.yaml").write_text(rundir.dump({"job_id": run.job_id, "array_job_id": job, "array_task": i,
                                                                    "sweep": str(array.path)}))
    print(f"submitted job array {job} ({len(runs)} tasks; its script and points: {array.path}):", file=out)
    for run in runs:
        print(f"  task {run.job_id}: {run.run_dir.name}  {' '.join(run.meta_extra['sweep']['overrides'])}", file=out)


def run_locally(runs: list[Run], pipeline: bool) -> int:
    """The local executor: one run after the other; a pipeline stops at its first failed stage."""
    from launcher import local_exec

    worst = 0
    for i, run in enumerate(runs):
        if len(runs) > 1:
            print(f"moe-launch: run {i + 1}/{len(runs)}: {run.run_dir.name}", file=sys.stderr, flush=True)
        rc = local_exec.run(run.run_dir / run.script_name)
        worst = worst or rc
        if rc and pipeline:
            skipped = [r.stage.name for r in runs[i + 1:]]
            if skipped:
                print(f"moe-launch: stage {run.stage.name} failed (exit {rc}); not running {', '.join(skipped)}", file=sys.stderr)
            return rc
    return worst


# ------------------------------------------------------------------------------------------ resume
ATTEMPTS_DIR = "attempts"  # earlier attempts' job files, attempts/<n>/
_ATTEMPT_FILES = ("job.sbatch", "job.sh", "recipe.yaml", "cluster.yaml", "plan.yaml", "submission.yaml", "local.yaml", "EXIT_CODE")
ACTIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED", "RESIZING")


def resume_run(run_dir: Path, overrides: list[str], profile: ClusterProfile | None, argv: list[str], dry_run: bool,
               memory_check: bool) -> Run:
    """A new attempt of a training run in its own directory: the run's recipe (with ``overrides``) on its
    profile (or ``profile``), checked, re-rendered and written; the earlier attempt's job files move to
    ``attempts/<n>/`` and ``attempts.yaml`` records each attempt. The trainer resumes from the run's newest
    checkpoint (refusing what the checkpoint cannot take) and continues its metrics."""
    from launcher import jobs, local_exec
    from launcher.cluster import ClusterProfile as Profile

    if not (run_dir / "recipe.yaml").is_file():
        raise UserError(f"{run_dir.name} is not a training run (no recipe.yaml); run its `launch export|generate|eval` again", "RUN")
    job = jobs.job_id_of(run_dir)
    if job:
        st = jobs.status(job)
        if st is not None and st.state in ACTIVE:
            raise UserError(f"run {run_dir.name} is still {st.state} as job {job}; `launch cancel` it first", "RUN")
    local = local_exec.read_state(run_dir)
    if local and local.get("state") == "RUNNING" and local_exec.alive(local):
        raise UserError(f"run {run_dir.name} is still running here (pid {local['pid']}); `launch cancel` it first", "RUN")
    recipe = rundir.load_run_recipe(run_dir)
    recipe = recipe_loader.apply_overrides(recipe, [*overrides, "checkpoint.resume=true"])
    profile = profile or config_io.load_yaml_into(Profile, run_dir / "cluster.yaml")
    pre = run_preflight(recipe, profile, memory_check=memory_check)
    if not pre.ok:
        raise UserError(f"cannot resume {run_dir.name} on {profile.describe()}: " + "; ".join(map(str, pre.errors)), "RUN")
    save_dir = resume.checkpoint_dir(run_dir, recipe)
    if recipe.backend.name == "nemo":  # NeMo's checkpoints: NeMo checks what it restores
        steps = resume.complete_checkpoints(run_dir, recipe)
        found = steps[max(steps)] if steps else None
    else:
        try:
            found = resume.check_save_dir(save_dir, {"fingerprint": fingerprint(recipe), "layout": pre.layout.dims()})
        except resume.ResumeRefused as exc:
            raise UserError(f"cannot resume from {resume.latest(save_dir)}: {exc}", "RUN") from None
    run = Run(run_dir.name.split("-", 2)[-1], recipe.name, recipe, run_dir / "recipe.yaml", overrides=overrides, pre=pre, run_dir=run_dir)
    python = python_on_nodes(profile, recipe.backend.container_image or profile.container.image)
    plan = plan_dict(recipe, profile, pre)
    run.script_name = "job.sbatch" if profile.executor == "slurm" else "job.sh"
    run.files = {run.script_name: render(RenderInput(recipe, profile, pre.layout, str(run_dir), python=python)),
                 "recipe.yaml": config_io.to_yaml(recipe), "cluster.yaml": config_io.to_yaml(profile), "plan.yaml": rundir.dump(plan)}
    run.lines = summary(recipe, run.spec, profile, pre, plan)
    run.lines.append(f"resume   {'from ' + str(found) if found else 'no checkpoint yet: from step 0'}, in {run_dir}")
    if dry_run:
        return run
    # the earlier attempt's files move aside; nothing of it is lost
    attempts_file = run_dir / "attempts.yaml"
    history = (rundir.read(run_dir, "attempts.yaml") or []) if attempts_file.exists() else []
    n = len(history) + 1
    archive = run_dir / ATTEMPTS_DIR / str(n)
    archive.mkdir(parents=True, exist_ok=False)
    for name in _ATTEMPT_FILES:
        if (run_dir / name).exists():
            (run_dir / name).rename(archive / name)
    for name, text in run.files.items():
        (run_dir / name).write_text(text)
        if name.endswith((".sbatch", ".sh")):
            (run_dir / name).chmod(0o755)
    meta = provenance.metadata(argv, run_dir / "recipe.yaml", dry_run)
    history.append({"attempt": n + 1, "command": meta["command"], "created": meta["created"], "host": meta["host"],
                    "cluster": profile.name, "resumed_from": str(found) if found else None, "previous": str(archive.relative_to(run_dir))})
    attempts_file.write_text(rundir.dump(history))
    return run


