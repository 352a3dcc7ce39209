"""Jobs on a trained model: ``launch export | generate | eval`` (torch-free, like all of the submit side).

Everything a user can get wrong is checked here before anything is written or queued: the run and
its checkpoint step, the export format against the run's PEFT setting, an output directory that
already exists, prompts that do not fit the model. The job itself is a run directory like a training
run's (``<runs>/<stamp>-<kind>-<name>-<cluster>``: the script, ``task.yaml``, ``cluster.yaml``,
``plan.yaml``, ``meta.yaml``, ``logs/``), rendered from the same templates, so it is submitted,
followed and cancelled the same way; what it produces goes where ``task.yaml`` says (by default into
the trained run's directory: ``export/<format>-step-N``, ``eval/<split>-step-N``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from launcher import config_io, rundir
from launcher.errors import UserError
from launcher.recipe import Recipe
from launcher.resume import choose_checkpoint
from launcher.rundir import load_run_recipe

TASK_FILE = "task.yaml"
PROMPTS_FILE = "prompts.jsonl"  # generate: the prompts, copied into the job's run directory
ENTRY_MODULES = {"export": "export.main", "generate": "generation.main", "eval": "evaluation.main", "bench": "commbench.main"}
NEMO_EXPORT_MODULE = "nemo_backend.export"  # a nemo run's export: NeMo's exporter, in the run's container
FORMATS = ("hf", "merged", "peft")
DTYPES = ("bf16", "fp32")
# PEFT (0.21, with transformers v5) rewrites any target named gate_proj/up_proj/down_proj of a DeepSeek-V3
# model into the fused routed-expert parameters: an adapter on a dense or shared-expert MLP cannot be
# expressed. Only the attention projections load where they were trained.
PEFT_EXPRESSIBLE = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


@dataclass
class Task:
    """What a job on a trained model does; the job reads it from ``task.yaml``."""

    kind: str  # export | generate | eval | bench
    source: str  # a training run's directory, or (generate) a Hugging Face model directory; bench: the runs directory
    source_kind: str = "run"  # run | hf | cluster (bench)
    checkpoint: Optional[str] = None  # the run's checkpoint (step directory)
    step: Optional[int] = None
    out: Optional[str] = None  # export: the model directory; eval: the results directory; generate: a .jsonl file
    # export
    format: str = "hf"  # hf | merged | peft
    dtype: str = "bf16"  # bf16 | fp32
    max_shard_bytes: int = 5 * 10**9
    # generate / eval
    template: Optional[str] = None  # chatml | plain | raw; None: the run's (or the export's) template
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8  # prompts per rank decoded together
    split: str = "test"
    limit: Optional[int] = None  # eval: the first N examples only
    data: Optional[str] = None  # eval of a Hugging Face directory: the SFT data directory (a run's: its recipe's)
    seq_length: Optional[int] = None  # eval of a Hugging Face directory: tokens per example for the loss


def load_task(run_dir: Path) -> Task:
    return config_io.load_yaml_into(Task, Path(run_dir) / TASK_FILE)


def resolve_source(spec: str, root: Path, allow_hf: bool) -> tuple[Path, str]:
    """(directory, "run" | "hf"): a Hugging Face model directory (has config.json), or a run as
    ``launch status`` finds it (run directory, run name, Slurm job id)."""
    from launcher import jobs

    path = Path(os.path.expanduser(spec))
    if allow_hf and (path / "config.json").is_file() and not (path / "meta.yaml").is_file():
        return path.absolute(), "hf"
    try:
        return jobs.find_run(spec, root).absolute(), "run"
    except UserError:
        what = "a run directory, a run name under " + str(root) + ", a Slurm job id"
        raise UserError(f"{spec!r} is not {what}{', or a Hugging Face model directory (with config.json)' if allow_hf else ''}",
                        "RUN") from None


def lora_targets(recipe: Recipe) -> list[str]:
    return list(recipe.peft.targets) if recipe.peft.method == "lora" else []


def check_export_format(run: Path, recipe: Recipe, fmt: str) -> None:
    lora = recipe.peft.method == "lora"
    if fmt == "peft" and not lora:
        raise UserError(f"run {run.name} is a full fine-tune (peft.method {recipe.peft.method}): it has no adapters; use --format hf", "--format")
    if fmt == "hf" and lora:
        raise UserError(f"run {run.name} trained LoRA adapters on frozen weights; export --format merged (adapters folded into "
                        "the weights) or --format peft (the adapters alone)", "--format")
    if fmt == "peft":
        odd = [t for t in lora_targets(recipe) if t not in PEFT_EXPRESSIBLE]
        if odd:
            raise UserError(f"PEFT cannot express adapters on {', '.join(odd)} of a DeepSeek-V3 model (peft maps those names "
                            "onto the fused routed experts of transformers' DeepseekV3); use --format merged", "--format")


def parse_size(text: str) -> int:
    """'5GB', '500MiB', '2e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]i?b?|b)?\s*", text.lower())
    if not m:
        raise UserError(f"{text!r} is not a size (e.g. 5GB, 500MiB)", "--max-shard-size")
    unit = (m.group(2) or "b").rstrip("b") or "b"
    scale = {"b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    size = int(float(m.group(1)) * scale)
    if size < 1:
        raise UserError(f"{text!r} must be at least one byte", "--max-shard-size")
    return size


def new_output_dir(path: Path, explicit: bool, what: str) -> Path:
    """An output directory that does not exist: an explicit one must not; a default one gets -2, -3, ..."""
    if not path.exists():
        return path
    if explicit:
        raise UserError(f"{path} already exists; {what} never overwrites: choose another --out", "--out")
    n = 2
    while path.with_name(f"{path.name}-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}-{n}")


# ------------------------------------------------------------------------------------------ prompts
def read_prompts(file: Path) -> list[dict]:
    """Prompts of a JSONL file: each line an object with "prompt" (or "input") and optionally "id"."""
    if not file.is_file():
        raise UserError(f"no such file {file}", "--input")
    try:
        with open(file, encoding="utf-8") as f:
            lines = list(config_io.jsonl_records(f, file))
    except UserError as exc:
        raise UserError(exc.message, f"--input {file}") from None
    rows = []
    for lineno, obj in lines:
        text = obj.get("prompt", obj.get("input")) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise UserError(f"line {lineno}: needs a string field \"prompt\" (or \"input\")", f"--input {file}")
        rows.append({"id": obj.get("id", len(rows)), "prompt": text})
    if not rows:
        raise UserError("has no prompts", f"--input {file}")
    return rows


def check_prompt_lengths(prompts: list[str], tokenizer_spec: str, template: str, max_positions: int) -> None:
    """A prompt must leave room for one new token within the model's positions. Checked here when the
    tokenizer can be read without torch (the byte tokenizer, or ``tokenizers`` installed); the job checks again."""
    import importlib.util

    from trainer.chat import render_chat
    from trainer.tokenizer import load_tokenizer

    if tokenizer_spec != "byte" and importlib.util.find_spec("tokenizers") is None:
        return
    try:
        tok = load_tokenizer(tokenizer_spec)
    except (OSError, ValueError, UserError):
        return  # not visible (or not readable) from here: the job reports it
    for i, text in enumerate(prompts):
        n = len(prompt_ids(template, text, tok, render_chat))
        if n >= max_positions:
            raise UserError(f"prompt {i} has {n} tokens with the {template} template; the model has {max_positions} positions "
                            "(max_position_embeddings): shorten it", "--prompt")


def prompt_ids(template: str, text: str, tok, render_chat) -> list[int]:
    """The ids the model sees for a prompt: the chat template's prompt part, or (raw) bos + the text; bos only
    when the text does not already start with it (a prompt rendered by a chat template, as raw SFT data is)."""
    if template == "raw":
        ids = tok.encode(text)
        return ids if tok.bos_id is None or ids[:1] == [tok.bos_id] else [tok.bos_id] + ids
    return render_chat(template, text, "", tok)[0]


def export_template(hf_dir: Path) -> str | None:
    """The chat template a moe-launch export was trained with (from its moe_launch_export.json)."""
    meta = hf_dir / "moe_launch_export.json"
    if meta.is_file():
        try:
            return json.loads(meta.read_text()).get("template")
        except ValueError:
            return None
    return None


def uses_nemo(prepared: "Prepared") -> bool:
    """A nemo run's export: NeMo's exporter, in the run's container."""
    return prepared.task.kind == "export" and prepared.recipe is not None and prepared.recipe.backend.name == "nemo"


def job_image(prepared: "Prepared", profile) -> str | None:
    """The container the job runs in, as the job script renders it: the run's backend image, else the profile's."""
    return (prepared.recipe.backend.container_image if prepared.recipe is not None else None) or profile.container.image


def prepare_bench(profile, root: Path) -> Prepared:
    """`launch bench comm`: every node and process of the profile; the measured figures go to its overlay."""
    from launcher.cluster import measured_path

    out = measured_path(profile.name)
    layout = _job_layout(profile, profile.nodes)
    task = Task(kind="bench", source=str(root), source_kind="cluster", out=str(out))
    lines = [f"bench    all-reduce, all-gather, reduce-scatter and all-to-all inside a node and across nodes on "
             f"{profile.describe()}", f"writes   {out} (the planner's interconnect for {profile.name}; the profile stays as it is)"]
    return Prepared(task, layout, lines, None, {})


def job_label(prepared: "Prepared") -> str:
    t = prepared.task
    if t.kind == "bench":
        return "bench-comm"
    return f"{t.kind}-{prepared.recipe.name if prepared.recipe is not None else Path(t.source).name}"


def render_job(prepared: "Prepared", profile, run_dir: Path, argv: list[str], dry_run: bool, python: str | None = None,
               job_name: str | None = None, meta_extra: dict | None = None) -> tuple[str, dict[str, str]]:
    """(script name, the files of the job's run directory)."""
    from launcher import provenance
    from launcher.render import RenderInput, render

    task, layout = prepared.task, prepared.layout
    label = job_name or job_label(prepared)
    script_name = "job.sbatch" if profile.executor == "slurm" else "job.sh"
    nemo = uses_nemo(prepared)
    script = render(RenderInput(prepared.recipe or Recipe(name=label), profile, layout, str(run_dir), python=python,
                                entry_module=NEMO_EXPORT_MODULE if nemo else ENTRY_MODULES[task.kind], job_name=label,
                                what={"export": "export", "generate": "generation", "eval": "evaluation",
                                      "bench": "communication benchmark"}[task.kind]))
    plan = {"cluster": profile.name, "task": task.kind, "source": task.source, "layout": layout.dims(),
            "nodes": layout.nodes, "processes_per_node": layout.gpus_per_node}
    meta = {**provenance.metadata(argv, Path(task.source), dry_run), "task": {"kind": task.kind, "source": task.source}, **(meta_extra or {})}
    files = {script_name: script, TASK_FILE: config_io.to_yaml(task), "cluster.yaml": config_io.to_yaml(profile),
             "plan.yaml": rundir.dump(plan), "meta.yaml": rundir.dump(meta), **prepared.files}
    if job_image(prepared, profile) and profile.executor == "slurm":  # the container runs the code that planned the job (PYTHONPATH)
        files.update(provenance.code_snapshot())
    return script_name, files


def write_job(prepared: "Prepared", profile, root: Path, argv: list[str], dry_run: bool):
    """Render and write the job's run directory (not yet submitted); returns the submission Run."""
    from launcher.submission import Run, write_runs

    label = job_label(prepared)
    for _ in range(100):
        run_dir = rundir.reserve_name(root, label, profile.name)
        script_name, files = render_job(prepared, profile, run_dir, argv, dry_run)
        run = Run(label, run_dir=run_dir, script_name=script_name, files=files)
        try:
            write_runs([run])
            return run
        except FileExistsError:
            continue
    raise UserError(f"could not pick a free run directory name under {root}", "runs dir")


# ------------------------------------------------------------------------------------ the three commands
def parser(kind: str, stage: str | None = None):
    """The options of ``launch export|generate|eval``. ``stage``: where a pipeline stage's args come from
    (the pipeline gives the cluster and the runs directory; errors name the stage)."""
    import argparse

    run_help = "run directory, run name or Slurm job id of a training run (in a pipeline: {stage})"
    examples = {"export": "launch export 20261202-101500-smoke-local --cluster local --format hf --dtype bf16",
                "generate": 'launch generate 20261202-101500-smoke-local --cluster local --prompt "What is 3 + 4?"',
                "eval": "launch eval 20261202-101500-smoke-local --cluster local --split test"}
    p = argparse.ArgumentParser(prog=f"launch {kind}", epilog=f"example: {examples[kind]}", description={
        "export": "Export a run's checkpoint (any training layout) to a Hugging Face directory in the hub's DeepSeek-V3 "
                  "layout: the full model (hf), LoRA merged into it (merged) or a PEFT adapter (peft).",
        "generate": "Generate answers with a run's checkpoint or a Hugging Face directory, with MLA's compressed KV cache, "
                    "on the cluster (TP/EP across processes when the model needs them).",
        "eval": "Answer every example of a data split with a run's checkpoint (or a Hugging Face directory, with --data) and "
                "score it: results.csv (one row per example, exact match and token F1, metadata carried over) and summary.json."}[kind])
    p.add_argument("source", metavar="RUN" if kind == "export" else "RUN|HF_DIR",
                   help=run_help + (", or a Hugging Face model directory" if kind != "export" else ""))
    if stage:
        def error(message: str):
            raise UserError(message, stage)
        p.error = error
    else:
        p.add_argument("--cluster", "-c", required=True, help="cluster profile name or path to a .yaml profile")
        p.add_argument("--runs-dir", help="where run directories are (default: $MOE_LAUNCH_RUNS, the profile's runs_dir, ./runs)")
        p.add_argument("--dry-run", action="store_true", help="check, render and write the job's run directory; print the script; run nothing")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    if kind == "export":
        p.add_argument("--out", help="output directory (default: RUN/export/<format>-step-<N>); never overwritten")
        p.add_argument("--format", choices=FORMATS, help="hf (full fine-tune, the default), merged (LoRA, the default), peft")
        p.add_argument("--dtype", choices=DTYPES, default="bf16", help="dtype of the weights (default bf16)")
        p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
        p.add_argument("--nodes", type=int, default=1, help="nodes whose processes share the shards (default 1)")
        return p
    if kind == "generate":
        p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
        p.add_argument("--input", help='JSONL file of prompts: {"prompt": ..., "id": ...} per line')
        p.add_argument("--template", choices=("chatml", "plain", "raw"), help="prompt template (default: the run's or the export's; raw for others)")
        p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; else sampling")
        p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
        p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
        p.add_argument("--out", help="write the generations here (JSONL; default: the job's run directory)")
    else:
        p.add_argument("--split", default="test", help="training | validation | test (default test)")
        p.add_argument("--data", help="a Hugging Face directory's SFT data directory (training/validation/test.jsonl)")
        p.add_argument("--template", choices=("chatml", "plain", "raw"),
                       help="prompt template (default: the run's, or the export's moe_launch_export.json)")
        p.add_argument("--seq-length", type=int, help="a Hugging Face directory's tokens per example for the loss "
                                                       "(default: its positions, at most 4096)")
        p.add_argument("--limit", type=int, help="evaluate the first N examples only")
        p.add_argument("--out", help="results directory (default: RUN/eval/<split>-step-<N>)")
    batch = 8 if kind == "generate" else 16
    p.add_argument("--max-new-tokens", type=int, default=256, help="new tokens per answer at most (default 256)")
    p.add_argument("--batch-size", type=int, default=batch, help=f"prompts each rank decodes together (default {batch})")
    p.add_argument("--nodes", type=int, help="nodes to use (default: the fewest that hold the model)")
    p.add_argument("--tp", type=int, help="tensor parallel size (default: the smallest that fits)")
    p.add_argument("--ep", type=int, help="expert parallel size (default: the smallest that fits)")
    return p


@dataclass
class Source:
    """What a job works on: a run on disk, a run this launch will create (a pipeline's training stage), or
    a Hugging Face directory."""

    path: Path
    kind: str  # run | hf
    recipe: Recipe | None = None
    pending: bool = False  # the run does not exist yet: its checkpoint and default output are found at job start


def source_of(spec: str, root: Path, allow_hf: bool, pending: dict[str, Source] | None = None, nemo_ok: bool = False) -> Source:
    """``pending``: what earlier stages of a pipeline will have made, by path (training runs; export directories,
    kind hf, with the recipe of the run they export)."""
    key = os.path.abspath(os.path.expanduser(spec)).rstrip("/")
    if pending and key in pending and (allow_hf or pending[key].kind == "run"):
        src = pending[key]
    elif pending and key in pending:
        raise UserError(f"{spec!r} is an earlier stage's Hugging Face export, not a training run", "RUN")
    else:
        path, kind = resolve_source(spec, root, allow_hf)
        src = Source(path, kind, load_run_recipe(path) if kind == "run" else None)
    if src.kind == "run" and src.recipe.backend.name != "native" and not (nemo_ok and src.recipe.backend.name == "nemo"):
        raise UserError(f"run {src.path.name} trained with the {src.recipe.backend.name} backend: its checkpoints are NeMo's "
                        "own format; export it (launch export RUN), then give the export's directory here", "RUN")
    return src


def _checkpoint(task: Task, src: Source, step: int | None) -> None:
    if src.pending:
        task.step = step  # None: the newest, found when the job starts
    else:
        task.step, ckpt = choose_checkpoint(src.path, src.recipe, step)
        task.checkpoint = str(ckpt)


def _out(arg: str | None) -> Path | None:
    return Path(os.path.expanduser(arg)).absolute() if arg else None


def default_out(task: Task) -> Path:
    run = Path(task.source)
    if task.kind == "export":
        return run / "export" / f"{task.format}-step-{task.step}"
    return new_output_dir(run / "eval" / f"{task.split}-step-{task.step}", False, "eval")


def resolve_at_start(task: Task) -> Task:
    """At job start: the checkpoint and output of a task planned before its run existed (a pipeline stage)."""
    if task.source_kind == "run" and task.checkpoint is None:
        task.step, ckpt = choose_checkpoint(Path(task.source), load_run_recipe(Path(task.source)), task.step)
        task.checkpoint = str(ckpt)
    if task.out is None and task.kind in ("export", "eval"):
        task.out = str(default_out(task))
    if task.kind == "export" and Path(task.out).exists():
        raise UserError(f"{task.out} already exists; an export never overwrites: choose another --out", "--out")
    return task


def _job_layout(profile, nodes: int):
    from launcher.layout import Layout

    return Layout(tp=1, pp=1, vpp=1, cp=1, ep=1, etp=1, dp=nodes * profile.gpus_per_node, sp=False, nodes=nodes,
                  gpus_per_node=profile.gpus_per_node)


def _serving_dtype(profile, recipe: Recipe | None) -> str:
    """fp32 on CPU; on GPUs bf16 unless the run trained in fp32."""
    if profile.device != "cuda":
        return "fp32"
    return "fp32" if recipe is not None and recipe.train.precision == "fp32" else "bf16"


def _step_text(task: Task) -> str:
    return f"step {task.step}" if task.step is not None else "its newest checkpoint"


@dataclass
class Prepared:
    """A checked task, ready to render: the job's layout, its summary lines, extra files for its run directory."""

    task: Task
    layout: object
    lines: list[str]
    recipe: Recipe | None
    files: dict[str, str]


def prepare(kind: str, args, profile, root: Path, pending: dict[str, Source] | None = None) -> Prepared:
    return {"export": prepare_export, "generate": prepare_generate, "eval": prepare_eval}[kind](args, profile, root, pending)


def prepare_export(args, profile, root: Path, pending=None) -> Prepared:
    src = source_of(args.source, root, False, pending, nemo_ok=True)
    recipe, run = src.recipe, src.path
    fmt = args.format or ("merged" if recipe.peft.method == "lora" else "hf")
    check_export_format(run, recipe, fmt)
    nemo = recipe.backend.name == "nemo"
    if nemo and fmt == "peft":
        raise UserError(f"run {run.name} trained LoRA with NeMo, which has no PEFT export for DeepSeek; use --format merged",
                        "--format")
    if nemo and args.nodes != 1:
        raise UserError("a NeMo run's export is one process (NeMo's exporter); leave --nodes at 1", "--nodes")
    from model.hf_config import hf_model_type

    try:
        hf_model_type(recipe.model)  # a routing transformers cannot express would load there as another model
    except ValueError as exc:
        raise UserError(f"cannot export: {exc}", f"run {run.name}: model") from None
    if args.nodes < 1:
        raise UserError(f"must be >= 1, got {args.nodes}", "--nodes")
    task = Task(kind="export", source=str(run), format=fmt, dtype=args.dtype, max_shard_bytes=parse_size(args.max_shard_size))
    _checkpoint(task, src, args.step)
    out = _out(args.out) or (None if src.pending else default_out(task))
    if out is not None and out.exists():
        raise UserError(f"{out} already exists; an export never overwrites: choose another --out", "--out")
    task.out = str(out) if out else None
    lines = [f"export   run {run.name} {_step_text(task)} ({recipe.model.name}, {'LoRA' if recipe.peft.method == 'lora' else 'full'}) "
             f"-> {out or f'{run}/export/{fmt}-step-<N>'}", f"format   {fmt}, {args.dtype}, shards of at most {task.max_shard_bytes / 1e9:g} GB"]
    if nemo:
        from launcher.layout import Layout

        lines.append(f"job      NeMo's exporter in one process on {profile.name} ({'LoRA merged first, ' if fmt == 'merged' else ''}"
                     "its .bin rewritten as safetensors shards, our config, tokenizer and chat template)")
        layout = Layout(tp=1, pp=1, vpp=1, cp=1, ep=1, etp=1, dp=1, sp=False, nodes=1, gpus_per_node=1)
        return Prepared(task, layout, lines, recipe, {})
    lines.append(f"job      {args.nodes} node(s) x {profile.gpus_per_node} process(es) on {profile.name}, each writing its share of the shards")
    return Prepared(task, _job_layout(profile, args.nodes), lines, recipe, {})


def _inference_common(args, profile, cfg, prompt_tokens: int, task: Task) -> tuple[object, str]:
    """Check the decoding options and plan the layout; returns (layout, its description)."""
    from launcher import inference_plan

    for name, ok, rule in (("--max-new-tokens", task.max_new_tokens >= 1, ">= 1"), ("--batch-size", task.batch_size >= 1, ">= 1"),
                           ("--temperature", task.temperature >= 0, ">= 0 (0: greedy)"), ("--top-p", 0 < task.top_p <= 1, "in (0, 1]")):
        if not ok:
            raise UserError(f"must be {rule}, got {getattr(args, name[2:].replace('-', '_'))}", name)
    if args.nodes is not None and not 1 <= args.nodes <= profile.nodes:
        raise UserError(f"must be between 1 and the profile's {profile.nodes} nodes, got {args.nodes}", "--nodes")
    try:
        chosen, best = inference_plan.plan(cfg, profile, dtype_bytes=2 if task.dtype == "bf16" else 4, batch=task.batch_size,
                                           prompt_tokens=prompt_tokens, new_tokens=task.max_new_tokens, nodes=args.nodes,
                                           tp=args.tp, ep=args.ep)
    except ValueError as exc:
        field_name, _, msg = str(exc).partition(": ")
        raise UserError(msg, field_name) from None
    if chosen is None:
        raise UserError(f"the model does not fit for generation on {profile.describe()}: best {best.describe()}; "
                        "use a profile with more or bigger GPUs, or lower --batch-size", "--cluster")
    return chosen.layout, chosen.describe()


def prepare_generate(args, profile, root: Path, pending=None) -> Prepared:
    from model.hf_config import load_config

    if bool(args.prompt) == bool(args.input):
        raise UserError("give the prompts with --prompt TEXT (repeatable) or --input FILE.jsonl", "--prompt")
    src = source_of(args.source, root, True, pending)
    task = Task(kind="generate", source=str(src.path), source_kind=src.kind, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size)
    recipe = src.recipe
    if src.kind == "run":
        _checkpoint(task, src, args.step)
        cfg, tokenizer = recipe.model, recipe.data.tokenizer
        template = args.template or (recipe.data.template if recipe.data.kind == "sft" else "raw")
    else:
        if args.step is not None:
            raise UserError("a Hugging Face directory has no checkpoint steps", "--step")
        try:
            cfg = load_config(src.path)
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"config.json is not a DeepSeek-V3-family config: {exc}", str(src.path)) from None
        tokenizer = str(src.path)
        template = args.template or export_template(src.path) or "raw"
    task.template = template
    task.dtype = _serving_dtype(profile, recipe)
    rows = read_prompts(Path(args.input)) if args.input else [{"id": i, "prompt": p} for i, p in enumerate(args.prompt)]
    check_prompt_lengths([r["prompt"] for r in rows], tokenizer, template, cfg.max_position_embeddings)
    out = _out(args.out)
    if out is not None and out.exists():
        raise UserError(f"{out} already exists; generate never overwrites: choose another --out", "--out")
    task.out = str(out) if out else None
    longest = max(len(r["prompt"]) for r in rows)  # characters: an upper bound on tokens for every tokenizer we ship
    layout, how = _inference_common(args, profile, cfg, min(longest + 16, cfg.max_position_embeddings), task)
    what = f"run {src.path.name} {_step_text(task)}" if src.kind == "run" else f"{src.path}"
    lines = [f"generate {len(rows)} prompt(s) with {what} ({cfg.name}), template {template}, "
             f"{'greedy' if task.temperature == 0 else f'temperature {task.temperature} top-p {task.top_p} seed {task.seed}'}, "
             f"up to {task.max_new_tokens} new tokens", f"layout   {how}"]
    prompts = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return Prepared(task, layout, lines, recipe, {PROMPTS_FILE: prompts})


def prepare_eval(args, profile, root: Path, pending=None) -> Prepared:
    src = source_of(args.source, root, True, pending)
    recipe, run = src.recipe, src.path
    if src.kind == "hf":
        return _prepare_eval_hf(args, profile, src)
    if args.data is not None or args.seq_length is not None:
        raise UserError("a run is evaluated on its own data (data.path of its recipe); --data and --seq-length are for a "
                        "Hugging Face directory", "--data" if args.data is not None else "--seq-length")
    if recipe.data.kind != "sft":
        raise UserError(f"run {run.name} trained on {recipe.data.kind} data; answer evaluation needs SFT data "
                        "(input/output pairs)", "RUN")
    _check_split(args, recipe.data.path)
    task = Task(kind="eval", source=str(run), split=args.split, limit=args.limit, max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size, template=args.template or recipe.data.template, dtype=_serving_dtype(profile, recipe))
    _checkpoint(task, src, args.step)
    out = _out(args.out)
    if out is not None:
        out = new_output_dir(out, True, "eval")
    elif not src.pending:
        out = default_out(task)
    task.out = str(out) if out else None
    layout, how = _inference_common(args, profile, recipe.model, recipe.data.seq_length, task)
    lines = [f"eval     run {run.name} {_step_text(task)} ({recipe.model.name}) on the {args.split} split"
             f"{f' (first {args.limit})' if args.limit else ''}: greedy answers, exact match and token F1, loss",
             f"layout   {how}", f"results  {out or f'{run}/eval/{args.split}-step-<N>'}/results.csv, summary.json"]
    return Prepared(task, layout, lines, recipe, {})


def _check_split(args, data_path: str | None) -> None:
    if args.split not in ("training", "validation", "test"):
        raise UserError(f"{args.split!r} is not a split; use training, validation or test", "--split")
    if data_path is not None:
        data = Path(os.path.expanduser(data_path))
        if data.is_dir() and not (data / f"{args.split}.jsonl").is_file():
            raise UserError(f"the data has no {args.split}.jsonl in {data_path}", "--split")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"must be >= 1, got {args.limit}", "--limit")


def _prepare_eval_hf(args, profile, src: Source) -> Prepared:
    """Eval of a Hugging Face directory (a base model, or an export: a pipeline's stage before it, a NeMo run's)
    on an SFT data directory: the same job, with the data, template and sequence length given here."""
    from model.hf_config import load_config

    if args.step is not None:
        raise UserError("a Hugging Face directory has no checkpoint steps", "--step")
    if args.data is None:
        raise UserError(f"{src.path} is a Hugging Face directory: give the SFT data to evaluate on with --data DIR "
                        "(training/validation/test.jsonl)", "--data")
    data = Path(os.path.expanduser(args.data)).absolute()
    if not data.is_dir() and not src.pending:
        raise UserError(f"{args.data} is not a directory (expected training/validation/test.jsonl)", "--data")
    _check_split(args, str(data))
    if src.pending:  # an earlier stage's export: the model of the run it exports
        cfg, exported = src.recipe.model, src.recipe.data.template if src.recipe.data.kind == "sft" else None
    else:
        try:
            cfg = load_config(src.path)
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"config.json is not a DeepSeek-V3-family config: {exc}", str(src.path)) from None
        exported = export_template(src.path)
    template = args.template or exported
    if template is None:
        raise UserError(f"{src.path} does not say its chat template (no moe_launch_export.json); give --template "
                        "chatml, plain or raw", "--template")
    seq = args.seq_length or min(cfg.max_position_embeddings, 4096)
    if not 2 <= seq <= cfg.max_position_embeddings:
        raise UserError(f"must be between 2 and the model's {cfg.max_position_embeddings} positions, got {seq}", "--seq-length")
    out = _out(args.out)
    if out is None:
        raise UserError("evaluating a Hugging Face directory needs --out DIR for the results (the model's directory is "
                        "not written to)", "--out")
    task = Task(kind="eval", source=str(src.path), source_kind="hf", split=args.split, limit=args.limit, data=str(data),
                seq_length=seq, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, template=template,
                dtype="bf16" if profile.device == "cuda" else "fp32", out=str(new_output_dir(out, True, "eval")))
    layout, how = _inference_common(args, profile, cfg, seq, task)
    lines = [f"eval     {src.path} ({cfg.name}) on the {args.split} split of {data}{f' (first {args.limit})' if args.limit else ''}: "
             f"template {template}, greedy answers, exact match and token F1, loss", f"layout   {how}",
             f"results  {task.out}/results.csv, summary.json"]
    return Prepared(task, layout, lines, None, {})
