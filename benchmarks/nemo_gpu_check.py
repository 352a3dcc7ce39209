"""The nemo backend on one GPU, start to finish, in one command (run it inside NeMo's environment):

  srun --gpus=1 --container-image=nvcr.io/nvidia/nemo:25.09 --container-mounts=$PWD:$PWD \\
       bash -c "cd $PWD && python benchmarks/nemo_gpu_check.py --out /tmp/nemo-gpu-check"

What NeMo runs only on GPUs (its trainer, the HF importer and exporter: TransformerEngine, CUDA RNG, the
all-to-all dispatcher) never ran in CI, so this runs the tiny chain for real, through ``launch`` with a
local one-GPU profile: ``recipes/sft_pipeline_nemo.py`` (synthetic FP8 checkpoint -> BF16 -> SFT data ->
NeMo import -> NeMo SFT of the tiny DeepSeek-V3 model -> NeMo export -> our eval -> backtest), then checks
what each stage left and that NeMo's import followed by its export gives back the BF16 weights exactly
(the key mapping both ways). Writes ``OUT/nemo_gpu_check.json`` and prints a table; exit 1 if a check failed.

``--dry-run``: check and render the same chain without a GPU or NeMo (what CI runs so this never rots).
Takes a few minutes on one GPU (most of it NeMo's imports and the container's first CUDA kernels).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the tiny model on one GPU: no expert parallelism, a short bf16 run
OVERRIDES = ["parallel.ep=1", "train.precision=bf16", "train.max_steps=20", "checkpoint.interval=10"]


def profile_text(memory_gb: int) -> str:
    return ("name: gpu1\nexecutor: local\ndevice: cuda\nnodes: 1\ngpus_per_node: 1\n"
            f"gpu: {{type: gpu, memory_gb: {memory_gb}, peak_tflops: 989, assumed_mfu: 0.35}}\n")


def preconditions() -> list[str]:
    """What this environment lacks for the real run (empty: ready)."""
    missing = []
    try:
        import torch

        if not torch.cuda.is_available():
            missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    except ImportError:
        missing.append("torch")
    for module, why in (("nemo", "NeMo (nemo-toolkit[llm]); run inside nvcr.io/nvidia/nemo"),
                        ("transformer_engine", "TransformerEngine (NeMo's importer, exporter and layers need it)")):
        try:
            __import__(module)
        except ImportError:
            missing.append(why)
    return missing


def stage_dirs(runs: Path) -> dict[str, Path]:
    return {p.name.split(".", 1)[1].rsplit("-", 1)[0]: p for p in runs.iterdir() if p.name.startswith("2") and "." in p.name}


def round_trip(import_dir: Path, bf16_dir: Path, work: Path) -> dict:
    """NeMo's exporter on the imported (untrained) checkpoint, rewritten by our export code, against the BF16
    directory NeMo imported: every tensor transformers would save must come back bit for bit."""
    import torch
    from nemo.collections import llm
    from safetensors.torch import load_file

    from model.hf_config import config_to_hf, load_config
    from nemo_backend.export import bin_to_safetensors

    cfg_dir = work / "hf-config"
    cfg_dir.mkdir(parents=True)
    cfg = load_config(bf16_dir)
    (cfg_dir / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    llm.export_ckpt(path=import_dir, target="hf", output_path=work / "bin", overwrite=True, target_model_name=str(cfg_dir))
    bin_to_safetensors(work / "bin", work / "st", torch.bfloat16, 5 * 10**9)
    want, got = {}, {}
    for f in bf16_dir.glob("*.safetensors"):
        want.update(load_file(f))
    for f in (work / "st").glob("*.safetensors"):
        got.update(load_file(f))
    want = {k: v for k, v in want.items() if not k.startswith(f"model.layers.{cfg.num_hidden_layers}.")}  # MTP: not in HF's model
    differ = sorted(k for k in want if k not in got or got[k].shape != want[k].shape or
                    not torch.equal(got[k].to(torch.float32), want[k].to(torch.float32)))
    return {"tensors": len(want), "missing_or_different": differ[:10], "extra": sorted(set(got) - set(want))[:10],
            "ok": not differ and set(got) == set(want)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/moe-launch-nemo-gpu-check"), help="work directory (must not exist)")
    ap.add_argument("--dry-run", action="store_true", help="check and render the chain only (no GPU, no NeMo needed)")
    args = ap.parse_args(argv)
    if args.out.exists():
        print(f"moe-launch: error: --out: {args.out} already exists; give a new directory", file=sys.stderr)
        return 2
    if not args.dry_run and (missing := preconditions()):
        print("moe-launch: error: this check needs " + "; ".join(missing), file=sys.stderr)
        return 2
    args.out.mkdir(parents=True)
    memory = 80
    if not args.dry_run:
        import torch

        memory = int(torch.cuda.get_device_properties(0).total_memory / 2**30)
    profile = args.out / "gpu1.yaml"
    profile.write_text(profile_text(memory))
    runs = args.out / "runs"
    cmd = [sys.executable, "-m", "launcher.cli", str(ROOT / "recipes" / "sft_pipeline_nemo.py"), "--cluster", str(profile),
           "--runs-dir", str(runs), *OVERRIDES, *(["--dry-run"] if args.dry_run else [])]
    print("moe-launch: nemo gpu check: " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    report: dict = {"command": cmd, "launch_exit": rc, "seconds": round(time.perf_counter() - t0, 1), "dry_run": args.dry_run}
    stages = stage_dirs(runs) if runs.is_dir() else {}
    checks = {"launch": rc == 0, "stages": sorted(stages) == sorted(["backtest", "convert", "data", "eval", "export", "import", "train"])}
    if not args.dry_run and stages:
        train, export, evaluation = stages.get("train"), stages.get("export"), stages.get("eval")
        checks["import"] = (stages["import"] / "nemo" / "context").is_dir()
        checks["nemo_recipe_written"] = train is not None and (train / "nemo_recipe.yaml").is_file()
        log = (train / "logs" / "job.out").read_text(errors="replace") if train and (train / "logs" / "job.out").is_file() else ""
        losses = [float(x) for x in re.findall(r"reduced_train_loss[=:]\s*([0-9.]+)", log)]
        report["train_loss_first_last"] = [losses[0], losses[-1]] if losses else None
        if train is not None:
            from launcher.resume import complete_checkpoints
            from launcher.rundir import load_run_recipe

            report["train_checkpoints"] = sorted(complete_checkpoints(train, load_run_recipe(train)))
            checks["train_checkpoints"] = bool(report["train_checkpoints"])
        checks["export"] = export is not None and (export / "hf" / "model.safetensors.index.json").is_file()
        summary = evaluation / "results" / "summary.json" if evaluation else None
        if summary is not None and summary.is_file():
            s = json.loads(summary.read_text())
            report["eval"] = {k: s[k] for k in ("examples", "exact_match", "f1", "loss")}
        checks["eval"] = "eval" in report
        if checks["import"]:
            report["round_trip"] = round_trip(stages["import"] / "nemo", stages["convert"] / "bf16", args.out / "round-trip")
            checks["round_trip"] = report["round_trip"]["ok"]
    report["checks"] = checks
    (args.out / "nemo_gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'check':<22} result")
    for name, ok in checks.items():
        print(f"{name:<22} {'ok' if ok else 'FAILED'}")
    for key in ("train_loss_first_last", "train_checkpoints", "eval"):
        if key in report:
            print(f"{key:<22} {report[key]}")
    print(f"\nmoe-launch: nemo gpu check: {args.out / 'nemo_gpu_check.json'} ({report['seconds']} s)")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
