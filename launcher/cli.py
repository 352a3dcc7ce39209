"""The ``launch`` command.

  launch RECIPE --cluster NAME [key=value ...] [--dry-run] [--runs-dir DIR] [--ignore-memory] [--sweep key=v1,v2]
  launch PIPELINE --cluster NAME [key=value ...]   stages as dependent jobs (a file defining pipeline())
  launch plan RECIPE --cluster NAME [--search] [--nodes N]   memory, FLOPs, layouts, fewest nodes
  launch clusters        list cluster profiles on the search path
  launch recipes         list shipped recipes
  launch status [RUN]    job state (squeue/scontrol, then sacct, then sacct -c)
  launch logs [RUN] [-f] the job's output (-f: until the job has ended)
  launch cancel [RUN]    scancel the run's job
  launch list            recent runs as a table
  launch export RUN --cluster NAME       a run's checkpoint as a Hugging Face directory (hf | merged | peft)
  launch generate RUN|HF_DIR --prompt TEXT | --input FILE.jsonl --cluster NAME
  launch eval RUN [--split test] --cluster NAME   answers of the split -> results.csv, summary.json
  launch report RUN... [--out DIR]   an HTML page and PNG figures of a run (several: a sweep; a pipeline)
  launch bench comm --cluster NAME   measure the cluster's collective bandwidths (the planner's interconnect)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher import cluster, recipe_loader, resume, rundir
from launcher.errors import EXIT_USAGE, UserError
from launcher.recipe import Recipe


_COMMANDS = [
    ("launch RECIPE --cluster NAME [key=value ...]", "check, render, write the run directory, submit (this page)",
     ["launch recipes/smoke.py --cluster local",
      "launch full_ft --cluster h100-8x64 --dry-run train.max_steps=100 --sweep train.lr=1e-5,2e-5"]),
    ("launch plan RECIPE --cluster NAME", "memory per pipeline rank, FLOPs, step time; --search: every layout",
     ["launch plan recipes/full_ft.py --cluster h100-8x64 --search"]),
    ("launch resume RUN [key=value ...]", "continue a run in its own directory from its newest checkpoint",
     ["launch resume 20261202-101500-smoke-local train.max_steps=120"]),
    ("launch export RUN --cluster NAME", "a run's checkpoint as a Hugging Face directory (hf, merged, peft)",
     ["launch export 20261202-101500-smoke-local --cluster local --format hf"]),
    ("launch generate RUN|HF_DIR --cluster NAME", "answers with MLA's compressed cache (--prompt TEXT, --input FILE.jsonl)",
     ['launch generate 20261202-101500-smoke-local --cluster local --prompt "What is 3 + 4?"']),
    ("launch eval RUN --cluster NAME", "every example of a split answered and scored: results.csv, summary.json",
     ["launch eval 20261202-101500-smoke-local --cluster local --split test"]),
    ("launch data sft SRC... --out DIR", "raw records -> NeMo-style training/validation/test.jsonl (templates, split, stats)",
     ["launch data sft raw.jsonl --out data/sft --input-key question --output-key answer --template chatml"]),
    ("launch data tokens SRC... --out FILE", "text or JSONL -> the token file pretraining reads (parallel workers)",
     ["launch data tokens corpus/*.jsonl --out data/train.bin --tokenizer /ckpt/tokenizer --workers 8"]),
    ("launch report RUN... [--out DIR]", "HTML page + PNG figures: loss, throughput, memory vs plan, expert-load heat map",
     ["launch report 20261202-101500-smoke-local", "launch report RUN_A RUN_B --out /tmp/lr-sweep"]),
    ("launch bench comm --cluster NAME", "measure collective bandwidth in a node and across nodes for the planner",
     ["launch bench comm --cluster local-slurm-2n"]),
    ("launch list | status | logs | cancel [RUN]", "follow runs (list --state/--recipe/--since; logs -f)",
     ["launch list --state failed --since 2d", "launch status 1234"]),
    ("launch clusters | recipes", "the cluster profiles and shipped recipes", []),
]
COMMANDS = "commands:\n" + "".join(f"  {usage:<46} {what}\n" + "".join(f"      {ex}\n" for ex in examples)
                                     for usage, what, examples in _COMMANDS) + (
    "Each command has --help. Overrides are key=value, taken literally: train.max_steps=100 parallel.tp=4\n"
    "model=deepseek-v2-lite; checkpoint.load=RUN[:STEP] starts a new run from an earlier one's weights.")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch",
        description="Train DeepSeek-V3-family MoE models on Slurm: check a recipe against a cluster before anything is "
                    "queued, render a readable sbatch/torchrun job, keep a run directory, submit and follow it.",
        epilog=COMMANDS, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="recipe or pipeline file (recipes/full_ft.py, file.py:function) or shipped name")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    p.add_argument("--cluster", "-c", required=True, help="cluster profile name or path to a .yaml profile")
    p.add_argument("--dry-run", action="store_true", help="check, render and write the run directory; print the script; submit nothing")
    p.add_argument("--runs-dir", help="where run directories go (default: $MOE_LAUNCH_RUNS, the profile's runs_dir, ./runs)")
    p.add_argument("--ignore-memory", action="store_true", help="launch even when the memory estimate says it won't fit")
    p.add_argument("--sweep", action="append", default=[], metavar="key=v1,v2,...",
                   help="one run per value (repeat for a grid), each with its own run directory and job")
    return p


def _report_failure(recipe, recipe_path: Path, profile, pre, which: str | None = None) -> None:
    """Bad input: one line per wrong value, nothing else. A recipe that cannot run on this cluster: every
    problem of the run, then what would fit (for a single run: sweeps and pipelines say it per run)."""
    from launcher.suggest import suggestions  # only on failure: re-checks variants

    err = sys.stderr
    if pre.input_errors:  # one line per error; no warnings or advice around them
        for p in pre.errors:
            print(f"launch: error: {f'{which}: ' if which else ''}{p}", file=err)
        return
    print(f"launch: error: recipe {recipe.name} ({recipe_path}){f', {which},' if which else ''} cannot run on {profile.describe()}:", file=err)
    for p in pre.errors:
        print(f"  {p}", file=err)
    for p in pre.warnings:
        print(f"  warning: {p}", file=err)
    hints = suggestions(recipe, recipe_path, profile) if which is None else []
    if hints:
        print("what would fit:", file=err)
        for h in hints:
            print(f"  {h}", file=err)


def cmd_launch(args: argparse.Namespace, argv: list[str]) -> int:
    from launcher import submission

    profile, _ = cluster.load_profile(args.cluster)
    root = rundir.runs_root(args.runs_dir, profile.runs_dir)
    launch = submission.prepare_launch(args.recipe, args.overrides, args.sweep, profile, root, argv, args.dry_run,
                                       not args.ignore_memory, submission.check_can_run)
    runs, array = launch.runs, launch.array
    if launch.failed:
        for run in launch.failed:
            which = (None if len(runs) == 1 else f"stage {run.stage.name}" if run.stage
                     else "sweep point " + " ".join(run.overrides[-len(args.sweep):]))
            _report_failure(run.recipe, run.recipe_path, profile, run.pre, which)
        return EXIT_USAGE
    out = sys.stderr if args.dry_run else sys.stdout
    for i, run in enumerate(runs, 1):
        if len(runs) > 1:
            what = f"stage {i}/{len(runs)}: {run.stage.name}" if run.stage else f"run {i}/{len(runs)}: {' '.join(run.overrides[-len(args.sweep):])}"
            print(f"--- {what}", file=out)
        for line in run.lines:
            print(line, file=out)
        print(f"run dir  {run.run_dir}", file=out)
    if array is not None:
        print(f"sweep    one job array of {len(runs)} tasks: {array.path / 'array.sbatch'}", file=out)
    if args.dry_run:
        scripts = [str(r.run_dir / r.script_name) for r in runs]
        print(f"dry run: nothing submitted; the script{'s are' if len(runs) > 1 else ' is'} {' '.join(scripts)}", file=out)
        if array is not None:
            sys.stdout.write(f"# ==== {array.path / 'array.sbatch'}\n{array.files['array.sbatch']}")
        for run in runs:
            if len(runs) > 1:
                sys.stdout.write(f"# ==== {run.run_dir / run.script_name}\n")
            sys.stdout.write(run.files[run.script_name])
        return 0
    if array is not None:
        submission.submit_array(runs, array, out)
        return 0
    if profile.executor == "slurm":
        submission.submit_runs(runs, out)
        return 0
    return submission.run_locally(runs, launch.pipeline)


def cmd_plan(argv: list[str]) -> int:
    """``launch plan``: memory by pipeline rank, FLOPs and time; ``--search``: ranked layouts and the fewest nodes.
    Exit 0 when the recipe's layout is valid and fits, 1 when it is not (the answer), 2 for bad input."""
    import dataclasses

    from launcher import search
    from launcher.plan import comm_lines, compute_lines, memory_table, plan_dict, search_lines, summary
    from launcher.preflight import run_preflight
    from launcher.suggest import min_nodes

    p = argparse.ArgumentParser(prog="launch plan", description="Memory per pipeline rank, FLOPs and step time of a recipe on a "
                                "cluster, before queueing; --search ranks every valid layout and finds the fewest nodes. "
                                "Exit 0: fits; 1: does not; 2: bad input.",
                                epilog="example: launch plan recipes/lora.py --cluster h100-8x64 --nodes 5 parallel.pp=5")
    p.add_argument("recipe", help="recipe file or shipped recipe name")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    p.add_argument("--cluster", "-c", required=True, help="cluster profile name or path")
    p.add_argument("--nodes", type=int, help="plan for this many nodes of the profile's kind")
    p.add_argument("--search", action="store_true", help="rank every valid layout and find the fewest nodes that fit")
    p.add_argument("--max-nodes", type=int, default=1024, help="node budget of the fewest-nodes search (default 1024)")
    p.add_argument("--top", type=int, default=10, help="layouts to show with --search (default 10)")
    args = p.parse_intermixed_args(argv)
    profile, _ = cluster.load_profile(args.cluster)
    for flag, value in (("--nodes", args.nodes), ("--max-nodes", args.max_nodes), ("--top", args.top)):
        if value is not None and value < 1:
            raise UserError(f"must be >= 1, got {value}", flag)
    if args.nodes is not None:
        profile = dataclasses.replace(profile, nodes=args.nodes)
    recipe, recipe_path = recipe_loader.load_recipe(args.recipe)
    recipe = recipe_loader.apply_overrides(recipe, args.overrides)
    recipe = resume.resolve_load(recipe, rundir.runs_root(None, profile.runs_dir))
    pre = run_preflight(recipe, profile)
    if pre.input_errors and pre.layout is None:  # wrong values: no plan to show, and no node count would fix them
        for prob in pre.input_errors:
            print(f"launch: error: {prob}", file=sys.stderr)
        return EXIT_USAGE
    if pre.layout is not None and pre.memory is not None:
        for line in summary(recipe, args.recipe, profile, pre, plan_dict(recipe, profile, pre)):
            print(line)
        for line in (memory_table(recipe, profile, pre.memory_layout or pre.layout) + compute_lines(recipe, profile, pre.layout)
                     + comm_lines(recipe, profile, pre.layout)):
            print(line)
    for prob in pre.errors:
        print(f"error    {prob}")
    ok = pre.ok
    if args.search:
        for line in search_lines(search.layouts(recipe, profile), profile, args.top):
            print(line)
    if pre.input_errors:  # e.g. a missing input path: the plan stands, but no node count fixes this
        return EXIT_USAGE
    if args.search or not ok:
        found = search.fewest_nodes(recipe, profile, args.max_nodes)
        if found:
            n, c = found
            lay = c.layout
            print(f"fewest nodes that fit: {n} x {profile.gpus_per_node} {profile.gpu.type} with TP{lay.tp} PP{lay.pp} EP{lay.ep} "
                  f"ETP{lay.etp} CP{lay.cp} DP{lay.dp}{' SP' if lay.sp else ''}, {c.recompute} recompute "
                  f"({c.pre.memory.summary()})")
        else:
            print(f"fewest nodes that fit: none up to {args.max_nodes} nodes of {profile.gpus_per_node} {profile.gpu.type}")
        if any(getattr(recipe.parallel, k) is not None for k in ("tp", "pp", "ep")):
            own = min_nodes(recipe, profile)
            par = recipe.parallel
            fixed = " ".join(f"{k.upper()}{getattr(par, k)}" for k in ("tp", "pp", "ep", "etp", "cp") if getattr(par, k) is not None)
            print(f"with the recipe's own {fixed}: " + (f"{own} nodes" if own else "no node count up to 1024 fits"))
    return 0 if ok else 1


FOLLOW_HELP = {
    "list": ("Recent runs (newest first) with their cluster, job id, state and DP; dry runs only with --all.",
             "launch list --state failed --since 2d        launch list --cluster h100-8x64 --recipe 'dsv3-*'"),
    "status": ("A run's state (Slurm: scontrol, then sacct, then sacct -c; local: its record), and for a failed run "
               "the first error line and the log that holds its traceback.", "launch status        launch status 1234"),
    "logs": ("The job's output (the trainer's console); -f follows it until the job has ended.", "launch logs -f"),
    "cancel": ("Cancel the run's job: scancel on Slurm, SIGTERM to a local run (its ranks checkpoint at the end of the "
               "step; `launch resume` continues it).", "launch cancel 20261202-101500-smoke-local"),
}


def _follow_parser(name: str) -> argparse.ArgumentParser:
    description, example = FOLLOW_HELP[name]
    p = argparse.ArgumentParser(prog=f"launch {name}", description=description, epilog=f"example: {example}")
    if name != "list":
        p.add_argument("run", nargs="?", help="run directory, run name or Slurm job id (default: the newest run)")
    p.add_argument("--runs-dir", help="where run directories are (default: $MOE_LAUNCH_RUNS or ./runs, and every profile's runs_dir)")
    p.add_argument("--cluster", "-c", help="look in this profile's runs_dir (and ./runs)")
    if name == "logs":
        p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job has ended")
    if name == "list":
        p.add_argument("--state", help="only these states, comma-separated (e.g. failed,running; a prefix is enough)")
        p.add_argument("--recipe", help="only runs of recipes matching this name or glob (e.g. 'dsv3-*')")
        p.add_argument("--since", help="only runs started since: a date (2026-12-01), a time (2026-12-01T14:00) or an age (90m, 6h, 2d)")
        p.add_argument("--all", action="store_true", help="include dry runs (marked 'dry run')")
        p.add_argument("--limit", type=int, default=20, help="show at most N runs (default 20; 0: all)")
    return p


def _since(text: str):
    import datetime as dt
    import re

    m = re.fullmatch(r"(\d+)([mhd])", text)
    if m:
        unit = {"m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return dt.datetime.now() - dt.timedelta(**{unit: int(m.group(1))})
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"{text!r} is not a date (2026-12-01), a time (2026-12-01T14:00) or an age (90m, 6h, 2d)", "--since") from None


def _list_runs(jobs, args) -> int:
    import datetime as dt
    import fnmatch

    from launcher.plan import format_table

    if args.limit < 0:
        raise UserError(f"must be >= 0 (0: all runs), got {args.limit}", "--limit")
    roots = jobs.runs_roots(args.runs_dir, args.cluster)
    since = _since(args.since) if args.since else None
    states = [x.strip().lower() for x in args.state.split(",")] if args.state else None
    rows = []
    for run in jobs.runs_in(roots):
        if not args.all and jobs.is_dry_run(run):
            continue
        if since is not None:
            try:
                if dt.datetime.strptime(run.name[:15], "%Y%m%d-%H%M%S") < since:
                    continue
            except ValueError:
                continue
        if args.recipe and not fnmatch.fnmatchcase(jobs.recipe_name(run), args.recipe):
            continue
        if args.cluster and (rundir.read(run, "plan.yaml") if (run / "plan.yaml").exists() else {}).get("cluster") != args.cluster:
            continue
        row = jobs.summary_row(run)
        if states and not any(row[3].lower().startswith(s) for s in states):
            continue
        rows.append(row)
        if args.limit and len(rows) >= args.limit:
            break
    if not rows:
        print(f"no runs under {' or '.join(map(str, roots))}" + (" matching the filters" if any((states, since, args.recipe)) else ""))
        return 0
    for line in format_table([["run", "cluster", "job", "state", "dp"], *rows], left=2):
        print(line)
    return 0


def cmd_follow(name: str, argv: list[str]) -> int:
    """``launch status|logs|cancel|list``: follow jobs through their run directories."""
    from launcher import jobs, local_exec

    args = _follow_parser(name).parse_args(argv)
    if name == "list":
        return _list_runs(jobs, args)
    roots = jobs.runs_roots(args.runs_dir, args.cluster)
    array = jobs.find_array(args.run, roots) if name in ("status", "cancel") else None
    if array is not None:  # a sweep's job array: every task
        job, runs = array
        if name == "cancel":
            jobs.cancel(job)
            print(f"cancelled job array {job} ({len(runs)} tasks)")
            return 0
        for run in runs:
            rs = jobs.run_state(run)
            print(f"{jobs.job_id_of(run):>12}  {rs.state:<12} {run.name}" + (f"  error: {rs.error}" if rs.error else ""))
        return 0
    pipeline = jobs.find_pipeline(args.run, roots) if name in ("status", "cancel") else None
    if pipeline is not None and not _names_a_run(jobs, args.run, roots):  # a pipeline by name: all its stages
        return _pipeline_status_or_cancel(jobs, local_exec, name, *pipeline)
    run = jobs.find_run(args.run, roots)
    job = jobs.job_id_of(run)
    if name == "status":
        rs = jobs.run_state(run)
        print(f"run    {run}")
        print(f"state  {rs.state}: {rs.detail}" if rs.detail else f"state  {rs.state}")
        if rs.error:
            print(f"error  {rs.error}")
        if rs.log:
            print(f"log    {rs.log}")
        where = _report_location(run)
        if where:
            print(f"report {where}")
        if pipeline is not None:  # one stage of a pipeline: every stage, a line each
            print(f"pipeline {pipeline[0]}:")
            _stage_lines(jobs, pipeline[1])
        return 0
    if name == "cancel":
        if job:
            jobs.cancel(job)
            print(f"cancelled job {job} ({run.name})")
        elif local_exec.cancel(run):
            print(f"asked local run {run.name} to stop: its ranks checkpoint at the end of the step (`launch resume` continues it)")
        else:
            raise UserError(f"{run.name} is not running (nothing to cancel)", "RUN")
        return 0
    return _print_log(jobs, run, args.follow)


def _names_a_run(jobs, spec: str, roots: list[Path]) -> bool:
    try:
        jobs.find_run(spec, roots)
        return True
    except UserError:
        return False


def _stage_lines(jobs, runs: list[Path]) -> None:
    for run in runs:
        rs, info = jobs.run_state(run), jobs.pipeline_of(run) or {}
        print(f"  {info.get('index', '?')}/{info.get('of', '?')} {info.get('stage', run.name):<10} {rs.state:<11} "
              f"{jobs.job_id_of(run) or 'local':>8}  {run.name}" + (f"  error: {rs.error}" if rs.error else ""))


def _pipeline_status_or_cancel(jobs, local_exec, name: str, pipeline: str, runs: list[Path]) -> int:
    """``launch status|cancel PIPELINE``: every stage of the pipeline's newest launch (or of a stage's launch)."""
    if name == "status":
        print(f"pipeline {pipeline} ({len(runs)} stages, {runs[0].parent}):")
        _stage_lines(jobs, runs)
        return 0
    jobs_ids = [j for j in (jobs.job_id_of(r) for r in runs) if j]
    for job in jobs_ids:
        jobs.cancel(job)
    stopped = [r.name for r in runs if not jobs.job_id_of(r) and local_exec.cancel(r)]
    print(f"cancelled pipeline {pipeline}: {len(jobs_ids)} job(s)" + (f", stopped {', '.join(stopped)}" if stopped else ""))
    return 0


def _print_log(jobs, run: Path, follow: bool) -> int:
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
            _report_hint(run)
            return 0 if path.exists() else _no_log(path)
        if jobs.run_state(run).state.split()[0] not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED"):
            _report_hint(run)
            return 0  # the job has ended (or was never started): nothing more will come
        time.sleep(1)


def _report_location(run: Path) -> str | None:
    """A training run's report page, or the command that writes it; None for other runs."""
    if not (run / "metrics.jsonl").exists():
        return None
    page = run / "report" / "index.html"
    return str(page) if page.exists() else f"launch report {run.name}"


def _report_hint(run: Path) -> None:
    """Where the run's figures are (on stderr: the log itself stays the job's output)."""
    where = _report_location(run)
    if where:
        print(f"launch: report: {where}", file=sys.stderr)


def _no_log(path: Path) -> int:
    print(f"launch: no log yet at {path}", file=sys.stderr)
    return 0


def cmd_resume(argv: list[str]) -> int:
    """``launch resume RUN [key=value ...]``: a new attempt of a run in its own directory."""
    from launcher import jobs, slurm, submission

    p = argparse.ArgumentParser(
        prog="launch resume", description="Continue a training run in its own directory from its newest checkpoint: a new "
        "attempt (the earlier one's job files move to attempts/<n>/), the same metrics and checkpoints. Overrides may change "
        "what the checkpoint can take (steps, DP/EP layout, lr schedule, ...); a change it cannot take is refused.",
        epilog="example: launch resume 20261202-101500-smoke-local train.max_steps=120")
    p.add_argument("run", help="run directory, run name or Slurm job id")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides for this attempt")
    p.add_argument("--cluster", "-c", help="resume on this profile (default: the one the run used)")
    p.add_argument("--runs-dir", help="where run directories are (default: $MOE_LAUNCH_RUNS or ./runs, and every profile's runs_dir)")
    p.add_argument("--dry-run", action="store_true", help="check and render; print the script; change and submit nothing")
    p.add_argument("--ignore-memory", action="store_true", help="resume although the memory estimate says it won't fit")
    args = p.parse_intermixed_args(argv)
    run_dir = jobs.find_run(args.run, jobs.runs_roots(args.runs_dir, None))
    profile = cluster.load_profile(args.cluster)[0] if args.cluster else None
    run = submission.resume_run(run_dir, args.overrides, profile, ["resume", *argv], args.dry_run, not args.ignore_memory)
    out = sys.stderr if args.dry_run else sys.stdout
    for line in run.lines:
        print(line, file=out)
    if args.dry_run:
        print("dry run: nothing changed or submitted", file=out)
        sys.stdout.write(run.files[run.script_name])
        return 0
    if run.script_name == "job.sbatch":
        job = slurm.submit(run_dir / run.script_name)
        (run_dir / "submission.yaml").write_text(rundir.dump({"job_id": job}))
        print(f"submitted job {job}: {run_dir.name}", file=out)
        return 0
    return submission.run_locally([run], False)


# ------------------------------------------------------------------------------ jobs on a trained model
def cmd_task(name: str, argv: list[str]) -> int:
    """``launch export|generate|eval``: a job on a trained model (see launcher.tasks)."""
    from launcher import submission, tasks

    args = tasks.parser(name).parse_intermixed_args(argv)
    profile, _ = cluster.load_profile(args.cluster)
    root = rundir.runs_root(args.runs_dir, profile.runs_dir)
    prepared = tasks.prepare(name, args, profile, root)
    if not args.dry_run:
        submission.check_can_run(profile)
    # the job's run directory goes beside the run it works on (a Hugging Face directory: under the runs directory)
    task = prepared.task
    job = tasks.write_job(prepared, profile, Path(task.source).parent if task.source_kind == "run" else root, [name, *argv], args.dry_run)
    return _start_job(prepared, profile, job, args.dry_run)


def _start_job(prepared, profile, job, dry_run: bool, then: str | None = None) -> int:
    """Show a written job's summary, then print its script (dry run), submit it (Slurm) or run it here (local)."""
    from launcher import submission

    out = sys.stderr if dry_run else sys.stdout
    for line in prepared.lines:
        print(line, file=out)
    print(f"run dir  {job.run_dir}", file=out)
    if dry_run:
        print(f"dry run: nothing submitted; the script is {job.run_dir / job.script_name}", file=out)
        sys.stdout.write(job.files[job.script_name])
        return 0
    if profile.executor == "slurm":
        submission.submit_runs([job], out)
        if then:
            print(f"then     {then}", file=out)
        return 0
    return submission.run_locally([job], False)


def cmd_clusters() -> int:
    for name in cluster.available():
        try:
            prof, path = cluster.load_profile(name)
            print(f"{name:16s} {prof.shape():40s} {path}")
        except UserError as exc:
            print(f"{name:16s} (invalid: {exc})")
    return 0


def cmd_bench(argv: list[str]) -> int:
    """``launch bench comm --cluster NAME``: measure the cluster's collective bandwidths for the planner."""
    from launcher import submission, tasks

    p = argparse.ArgumentParser(
        prog="launch bench", description="comm: a short job on every node of the cluster that measures all-reduce, all-gather, "
        "reduce-scatter and all-to-all bandwidth inside a node and across nodes (torch.distributed: NCCL on GPUs, gloo on CPUs) "
        "and writes the figures to ~/.config/moe-launch/measured/<profile>.yaml, which `launch plan` then uses for that "
        "profile's communication times (the profile file is never rewritten; delete the measured file to go back).",
        epilog="example: launch bench comm --cluster local-slurm-2n")
    p.add_argument("what", choices=["comm"], help="what to measure")
    p.add_argument("--cluster", "-c", required=True, help="cluster profile")
    p.add_argument("--runs-dir", help="where the job's run directory goes")
    p.add_argument("--dry-run", action="store_true", help="render and show the job, submit nothing")
    args = p.parse_args(argv)
    profile, _ = cluster.load_profile(args.cluster)
    root = rundir.runs_root(args.runs_dir, profile.runs_dir)
    prepared = tasks.prepare_bench(profile, root)
    if not args.dry_run:
        submission.check_can_run(profile)
    job = tasks.write_job(prepared, profile, root, ["bench", *argv], args.dry_run)
    return _start_job(prepared, profile, job, args.dry_run,
                      then=f"launch status {job.run_dir.name}; launch plan RECIPE --cluster {profile.name} uses the figures")


def cmd_report(argv: list[str]) -> int:
    """``launch report RUN... [--out DIR]``: a run's report; several runs (or a sweep's job array): one overlay page;
    a pipeline's name: one page linking its stages."""
    from launcher import jobs

    p = argparse.ArgumentParser(
        prog="launch report", description="A self-contained HTML page (index.html) and PNG figures of a run: loss and lr, "
        "grad norm, tokens/s and MFU, peak memory per rank against the plan, the expert-load heat map per layer over steps, "
        "the layout, plan and warnings. Reads what exists: works on a running job. Several runs, or a sweep's job array, "
        "overlay their curves on one page; a pipeline's name gives one page linking its stages.",
        epilog="example: launch report 20261202-101500-smoke-local")
    p.add_argument("runs", nargs="*", metavar="RUN", help="run directories, run names, Slurm job ids, a sweep's array job id "
                   "or a pipeline's name (default: the newest run)")
    p.add_argument("--out", help="where to write (default: RUN/report for one run; for several, the first run's sweep "
                   "directory or a report-<time> directory beside the runs)")
    p.add_argument("--runs-dir", help="where run directories are (default: $MOE_LAUNCH_RUNS or ./runs, and every profile's runs_dir)")
    p.add_argument("--cluster", "-c", help="look in this profile's runs_dir (and ./runs)")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("launch report draws with matplotlib: pip install 'moe-launch[report]'", "matplotlib") from None
    from report import main as report

    roots = jobs.runs_roots(args.runs_dir, args.cluster)
    specs = args.runs or [None]
    out = Path(args.out).absolute() if args.out else None
    if len(specs) == 1:
        array = jobs.find_array(specs[0], roots)
        pipeline = jobs.find_pipeline(specs[0], roots) if array is None else None
        if array is not None:
            runs = array[1]
            out = out or runs[0].parent / f"report-array-{array[0]}"
        elif pipeline is not None and not _names_a_run(jobs, specs[0], roots):
            name, stages = pipeline
            out = out or stages[0].parent / f"report-{name}-{stages[0].name[:15]}"
            page = report.pipeline_report(name, stages, [jobs.run_state(r).state for r in stages], out)
            print(f"report   {page}")
            return 0
        else:
            run = jobs.find_run(specs[0], roots)
            page = report.run_report(run, out)
            print(f"report   {page}")
            return 0
    else:
        runs = [jobs.find_run(s, roots) for s in specs]
        out = out or runs[0].parent / f"report-{datetime_stamp()}"
    page = report.sweep_report(runs, out)
    print(f"report   {page} ({len(runs)} runs overlaid; each run's own report in RUN/report/)")
    return 0


def datetime_stamp() -> str:
    import datetime

    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def cmd_recipes() -> int:
    for name in recipe_loader.shipped_names():
        try:
            r, path = recipe_loader.load_target(name)
            if isinstance(r, Recipe):
                print(f"{name:14s} {r.model.name:18s} {r.peft.method:5s} {path}")
            else:
                print(f"{name:14s} {'pipeline':18s} {'':5s} {path}  ({' -> '.join(s.name for s in r.stages)})")
        except UserError as exc:
            print(f"{name:14s} (invalid: {exc})")
    return 0


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["clusters"]:
        return cmd_clusters()
    if argv[:1] == ["recipes"]:
        return cmd_recipes()
    if argv[:1] == ["plan"]:
        return cmd_plan(argv[1:])
    if argv[:1] and argv[0] in ("status", "logs", "cancel", "list"):
        return cmd_follow(argv[0], argv[1:])
    if argv[:1] and argv[0] in ("export", "generate", "eval"):
        return cmd_task(argv[0], argv[1:])
    if argv[:1] == ["resume"]:
        return cmd_resume(argv[1:])
    if argv[:1] == ["report"]:
        return cmd_report(argv[1:])
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    if argv[:1] == ["data"]:
        from dataprep.cli import main as data_main

        return data_main(argv[1:])
    args = _parser().parse_intermixed_args(argv)
    return cmd_launch(args, argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _dispatch(argv)
        sys.stdout.flush()  # here, not at interpreter exit, so that a closed pipe is handled below
        return code
    except UserError as exc:
        print(f"launch: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `launch list | head -3`: the reader left; stop quietly as other tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 141


if __name__ == "__main__":
    sys.exit(main())
