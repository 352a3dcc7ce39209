"""A Hugging Face BF16 checkpoint -> a NeMo checkpoint, as a pipeline stage:
``python -m nemo_backend.hf_import HF_DIR OUT`` (in NeMo's container; a training stage then starts from
``checkpoint.load=OUT checkpoint.load_format=nemo``).

Checked before NeMo is asked: the directory is a DeepSeek-V3-family checkpoint we can read, and not FP8
(NeMo's importer refuses those: convert first, ``moe-convert-fp8``). NeMo's importer reads the upstream
DeepSeek config keys (``scoring_func``, ``topk_method``, ``num_nextn_predict_layers``, ``aux_loss_alpha``),
which transformers' own config may omit: when some are missing, NeMo is given a view of the directory
(``OUT.hf-view``: links to its files, a config.json completed from our reading of it; kept, since the
checkpoint's context names its tokenizer there); the user's directory is never written. ``OUT`` must
not exist; it appears complete (NeMo writes ``OUT.partial`` first).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from launcher.errors import UserError

NEMO_KEYS = ("scoring_func", "topk_method", "num_nextn_predict_layers", "aux_loss_alpha", "n_group", "topk_group",
             "routed_scaling_factor", "norm_topk_prob")


def importer_source(hf_dir: Path, scratch: Path) -> tuple[Path, list[str]]:
    """(the directory NeMo imports, the config keys filled in). ``scratch``: where the completed view goes if needed."""
    from model.hf_config import config_to_hf, load_config

    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise UserError(f"{hf_dir} has no config.json: not a Hugging Face model directory", "HF_DIR")
    hf = json.loads(config_file.read_text())
    if hf.get("quantization_config"):
        raise UserError(f"{hf_dir} is an FP8 checkpoint; NeMo's importer needs BF16: convert it first "
                        f"(moe-convert-fp8 {hf_dir} OUT)", "HF_DIR")
    try:
        ours = config_to_hf(load_config(hf_dir))
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"config.json is not a DeepSeek-V3-family config: {exc}", str(hf_dir)) from None
    missing = [k for k in NEMO_KEYS if k not in hf and k in ours]
    if not missing:
        return hf_dir, []
    view = scratch
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for entry in hf_dir.iterdir():
        if entry.name != "config.json":
            (view / entry.name).symlink_to(entry.resolve())
    (view / "config.json").write_text(json.dumps({**hf, **{k: ours[k] for k in missing}}, indent=2) + "\n")
    return view, missing


def import_checkpoint(hf_dir: Path, out: Path) -> Path:
    import fiddle as fdl
    from nemo.collections import llm

    from model.hf_config import load_config
    from nemo_backend.recipe import family

    hf_dir, out = hf_dir.expanduser().resolve(), out.expanduser().absolute()
    if out.exists():
        raise UserError(f"{out} already exists; an import never overwrites: choose another OUT", "OUT")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    source, filled = importer_source(hf_dir, out.with_name(out.name + ".hf-view"))
    if filled:
        print(f"moe-launch: import: config.json lacks {', '.join(filled)} (NeMo's importer reads them); "
              "giving NeMo a view with them filled in", flush=True)
    cfg = load_config(hf_dir)
    fam = getattr(llm, family(cfg))
    model = fdl.build(fam.model(use_mtp=bool(cfg.num_nextn_predict_layers)) if family(cfg) == "deepseek_v3" else fam.model())
    llm.import_ckpt(model=model, source="hf://" + str(source), output_path=str(staging), overwrite=True)
    (staging / "moe_launch_import.json").write_text(json.dumps({"source": str(hf_dir)}, indent=2) + "\n")
    staging.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m nemo_backend.hf_import",
                                 description="Import a Hugging Face BF16 DeepSeek checkpoint as a NeMo checkpoint.")
    ap.add_argument("hf_dir", type=Path, metavar="HF_DIR")
    ap.add_argument("out", type=Path, metavar="OUT", help="the NeMo checkpoint directory to write (must not exist)")
    ap.add_argument("--check", action="store_true", help="check HF_DIR and OUT, show what NeMo would be given, import nothing")
    args = ap.parse_args(argv)
    try:
        if args.check:
            if args.out.exists():
                raise UserError(f"{args.out} already exists; an import never overwrites: choose another OUT", "OUT")
            scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"moe-launch-import-check-{os.getpid()}"
            source, filled = importer_source(args.hf_dir.expanduser().resolve(), scratch)
            shutil.rmtree(scratch, ignore_errors=True)
            print(f"moe-launch: import: would import {args.hf_dir}" + (f" (config keys filled in: {', '.join(filled)})" if filled else ""))
            return
        out = import_checkpoint(args.hf_dir, args.out)
    except UserError as exc:
        print(f"moe-launch: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"moe-launch: import: {args.hf_dir} -> {out}", flush=True)


if __name__ == "__main__":
    main()
