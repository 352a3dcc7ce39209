"""The fine-tuning chain as one pipeline: convert -> data -> train -> eval -> export -> backtest.

  launch recipes/sft_pipeline.py --cluster local-slurm                    # the tiny demo, as shipped
  launch recipes/sft_pipeline.py --cluster local-slurm peft.method=lora   # LoRA instead of full SFT

Every stage is its own job (on Slurm: afterok on the one before; a failing stage cancels the rest) with
its own run directory; ``launch status sft-pipeline`` shows them all. ``{stage}`` in an argument is
that stage's run directory. Overrides on the command line apply to the training stage.

  convert   moe-convert-fp8 FP8_CHECKPOINT -> {convert}/bf16 (as shipped: first writes a tiny synthetic
            checkpoint in DeepSeek's FP8 layout, ``python -m model.fp8_synthetic``)
  data      launch data sft RAW_DATA -> {data}/sft: training/validation/test.jsonl, stats.json
  train     TRAIN_RECIPE from the converted weights on that data (full SFT, or LoRA by override)
  eval      the test split answered and scored -> {eval}/results/results.csv, summary.json
  export    the trained model as a Hugging Face directory -> {export}/hf (LoRA: merged)
  backtest  BACKTEST on {eval}/results/results.csv -> {backtest}/scored.csv (as shipped: an example scorer)

To adapt it, set the four names below (or the environment variables they read) to your checkpoint,
raw data, training recipe and backtest command, e.g. for DeepSeek-V3:
FP8_CHECKPOINT=/lustre/ckpt/DeepSeek-V3, RAW_DATA=/lustre/data/raw.jsonl, TRAIN_RECIPE=full_ft (TP1 PP8
EP64) or lora (TP8 PP5 SP), and keep data.path / checkpoint.load pointing at the stages below.
"""

import os

from launcher import paths
from launcher.pipeline import Pipeline, Stage

EXAMPLES = paths.data_dir("examples")
FP8_CHECKPOINT = os.environ.get("FP8_CHECKPOINT")  # None: generate the tiny synthetic one
RAW_DATA = os.environ.get("RAW_DATA", str(EXAMPLES / "data" / "raw_qa.jsonl"))
TRAIN_RECIPE = os.environ.get("TRAIN_RECIPE", "smoke")  # the tiny model the synthetic checkpoint holds
SEQ_LENGTH = int(os.environ.get("SEQ_LENGTH", "256"))  # the data stage reports records longer than this
# The demo's short run; a real recipe keeps its own steps and schedule.
DEMO = ["train.max_steps=30", "train.warmup_steps=2", "train.lr=1e-3"] if TRAIN_RECIPE == "smoke" else []
BACKTEST = ["{python}", str(EXAMPLES / "backtest_example.py"), "{eval}/results/results.csv", "--out", "{backtest}/scored.csv"]


def pipeline() -> Pipeline:
    if FP8_CHECKPOINT:
        convert = ["moe-convert-fp8", FP8_CHECKPOINT, "{convert}/bf16"]
    else:
        convert = ["bash", "-c", '"$0" -m model.fp8_synthetic "$1/fp8" && "$0" -m model.fp8 "$1/fp8" "$1/bf16"',
                   "{python}", "{convert}"]
    return Pipeline(
        name="sft-pipeline",
        stages=[
            Stage("convert", command=convert),
            Stage("data", command=["{python}", "-m", "launcher.cli", "data", "sft", RAW_DATA, "--out", "{data}/sft",
                                   "--input-key", "question", "--output-key", "answer", "--template", "chatml",
                                   "--tokenizer", "{convert}/bf16", "--seq-length", str(SEQ_LENGTH), "--split", "0.8,0.1,0.1", "--seed", "1"]),
            Stage("train", recipe=TRAIN_RECIPE, overrides=[
                "checkpoint.load={convert}/bf16", "checkpoint.load_format=hf", "data.path={data}/sft",
                "data.tokenizer={convert}/bf16", "data.template=chatml", f"data.seq_length={SEQ_LENGTH}", *DEMO]),
            Stage("eval", task="eval", args=["{train}", "--split", "test", "--out", "{eval}/results", "--max-new-tokens", "16"]),
            Stage("export", task="export", args=["{train}", "--out", "{export}/hf"]),
            Stage("backtest", command=BACKTEST),
        ],
    )
