"""The ``launch`` command.

  launch RECIPE --cluster NAME [key=value ...] [--dry-run] [--runs-dir DIR] [--ignore-memory]
  launch clusters        list cluster profiles on the search path
  launch recipes         list shipped recipes
  launch status [RUN]    job state (squeue/scontrol, then sacct, then sacct -c)
  launch logs [RUN] [-f] the job's output (-f: until the job has ended)
  launch cancel [RUN]    scancel the run's job
  launch list            recent runs as a table
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher import cluster, config_io, provenance, recipe_loader, rundir
from launcher.errors import EXIT_USAGE, UserError
from launcher.plan import plan_dict, summary
from launcher.preflight import run_preflight
from launcher.render import RenderInput, render


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch",
        description="Check a recipe against a cluster, render its job and submit it.",
        epilog="Other commands: `launch clusters|recipes|list|status|logs|cancel`. Overrides use OmegaConf dotlist form, "
               "e.g. train.max_steps=100 parallel.tp=4 model=deepseek-v2-lite.",
    )
    p.add_argument("recipe", help="recipe file (recipes/full_ft.py, file.py:function) or shipped recipe name")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    p.add_argument("--cluster", "-c", required=True, help="cluster profile name or path to a .yaml profile")
    p.add_argument("--dry-run", action="store_true", help="check, render and write the run directory; print the script; submit nothing")
    p.add_argument("--runs-dir", help="where run directories go (default: $MOE_LAUNCH_RUNS, the profile's runs_dir, ./runs)")
    p.add_argument("--ignore-memory", action="store_true", help="launch even when the memory estimate says it won't fit")
    return p


def _report_failure(recipe, recipe_path: Path, profile, pre) -> None:
    from launcher.suggest import suggestions  # only on failure: re-checks variants

    err = sys.stderr
    print(f"launch: error: recipe {recipe.name} ({recipe_path}) cannot run on {profile.describe()}:", file=err)
    for p in pre.errors:
        print(f"  {p}", file=err)
    for p in pre.warnings:
        print(f"  warning: {p}", file=err)
    hints = suggestions(recipe, recipe_path, profile)
    if hints:
        print("what would fit:", file=err)
        for h in hints:
            print(f"  {h}", file=err)


def _check_can_run(profile) -> None:
    """Before anything is written: is there a way to run this job from here?"""
    if profile.executor == "slurm":
        from launcher import slurm

        slurm.require("sbatch")
    else:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            raise UserError("the local executor runs the native trainer, which needs PyTorch: pip install 'moe-launch[train]'", "--cluster local")
        if importlib.util.find_spec("trainer") is None:
            raise UserError("this install has no job-side trainer package; use --dry-run to check and render only", "--cluster local")


def cmd_launch(args: argparse.Namespace, argv: list[str]) -> int:
    profile, _ = cluster.load_profile(args.cluster)
    recipe, recipe_path = recipe_loader.load_recipe(args.recipe)
    recipe = recipe_loader.apply_overrides(recipe, args.overrides)
    pre = run_preflight(recipe, profile, memory_check=not args.ignore_memory)
    if not pre.ok:
        _report_failure(recipe, recipe_path, profile, pre)
        return EXIT_USAGE
    if not args.dry_run:
        _check_can_run(profile)

    plan = plan_dict(recipe, profile, pre)
    meta = provenance.metadata(argv, recipe_path, args.dry_run)
    root = rundir.runs_root(args.runs_dir, profile.runs_dir)
    script_name = "job.sbatch" if profile.executor == "slurm" else "job.sh"
    for _ in range(100):
        run_dir = rundir.reserve_name(root, recipe.name, profile.name)
        script = render(RenderInput(recipe, profile, pre.layout, str(run_dir)))
        files = {script_name: script, "recipe.yaml": config_io.to_yaml(recipe), "cluster.yaml": config_io.to_yaml(profile),
                 "plan.yaml": rundir.dump(plan), "meta.yaml": rundir.dump(meta)}
        try:
            rundir.create(run_dir, files)
            break
        except FileExistsError:
            continue
    else:
        raise UserError(f"could not pick a free run directory name under {root}", "runs dir")

    out = sys.stderr if args.dry_run else sys.stdout
    rel = recipe_path if not recipe_path.is_absolute() else Path(args.recipe.partition(":")[0])
    for line in summary(recipe, str(rel), profile, pre, plan):
        print(line, file=out)
    print(f"run dir  {run_dir}", file=out)
    if args.dry_run:
        print(f"dry run: nothing submitted; the script is {run_dir / script_name}", file=out)
        sys.stdout.write(script)
        return 0
    if profile.executor == "slurm":
        from launcher import slurm

        try:
            job_id = slurm.submit(run_dir / script_name)
        except UserError:
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)  # ours, just made: nothing half-submitted stays behind
            raise
        (run_dir / "submission.yaml").write_text(rundir.dump({"job_id": job_id}))
        print(f"submitted job {job_id}", file=out)
        return 0
    from launcher import local_exec

    return local_exec.run(run_dir / script_name)


def _follow_parser(name: str, help_run: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"launch {name}")
    p.add_argument("run", nargs="?", help=help_run)
    p.add_argument("--runs-dir", help="where run directories are (default: $MOE_LAUNCH_RUNS, then ./runs)")
    if name == "logs":
        p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job has ended")
    return p


def cmd_follow(name: str, argv: list[str]) -> int:
    """``launch status|logs|cancel|list``: follow jobs through their run directories."""
    from launcher import jobs

    args = _follow_parser(name, "run directory, run name or Slurm job id (default: the newest run)").parse_args(argv)
    root = rundir.runs_root(args.runs_dir, None)
    if name == "list":
        from launcher.plan import format_table

        rows = [jobs.summary_row(run) for run in jobs.runs_in(root)[:20]]
        if not rows:
            print(f"no runs under {root}")
            return 0
        for line in format_table([["run", "cluster", "job", "state", "dp"], *rows]):
            print(line)
        return 0
    run = jobs.find_run(args.run, root)
    job = jobs.job_id_of(run)
    if name == "status":
        st = jobs.status(job) if job else None
        print(f"run {run}")
        print(st.line() if st else (f"job {job}: unknown to Slurm (too old?)" if job else jobs.local_state(run)))
        return 0
    if name == "cancel":
        if not job:
            raise UserError(f"{run.name} was not submitted to Slurm (nothing to cancel)", "RUN")
        jobs.cancel(job)
        print(f"cancelled job {job} ({run.name})")
        return 0
    return _print_log(jobs, run, job, args.follow)


def _print_log(jobs, run: Path, job: str | None, follow: bool) -> int:
    import time

    path = jobs.log_file(run)
    pos = 0
    while True:
        if path.exists():
            with open(path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
                pos += len(chunk)
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
        if not follow:
            return 0 if path.exists() else _no_log(path)
        st = jobs.status(job) if job else None
        if job and (st is None or st.state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED")):
            return 0
        time.sleep(1)


def _no_log(path: Path) -> int:
    print(f"launch: no log yet at {path}", file=sys.stderr)
    return 0


def cmd_clusters() -> int:
    for name in cluster.available():
        try:
            prof, path = cluster.load_profile(name)
            print(f"{name:16s} {prof.shape():40s} {path}")
        except UserError as exc:
            print(f"{name:16s} (invalid: {exc})")
    return 0


def cmd_recipes() -> int:
    for name in recipe_loader.shipped_names():
        try:
            r, path = recipe_loader.load_recipe(name)
            print(f"{name:14s} {r.model.name:18s} {r.peft.method:5s} {path}")
        except UserError as exc:
            print(f"{name:14s} (invalid: {exc})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["clusters"]:
            return cmd_clusters()
        if argv[:1] == ["recipes"]:
            return cmd_recipes()
        if argv[:1] and argv[0] in ("status", "logs", "cancel", "list"):
            return cmd_follow(argv[0], argv[1:])
        args = _parser().parse_intermixed_args(argv)
        return cmd_launch(args, argv)
    except UserError as exc:
        print(f"launch: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
