"""The fine-tuning chain on the NeMo backend: convert -> data -> import -> train (NeMo) -> export -> eval -> backtest.

  launch recipes/sft_pipeline_nemo.py --cluster my-gpu-cluster            # NeMo's container: $NEMO_IMAGE
  launch recipes/sft_pipeline_nemo.py --cluster local-slurm --dry-run     # see every stage's job

The same stages as recipes/sft_pipeline.py (its settings: FP8_CHECKPOINT, RAW_DATA, TRAIN_RECIPE,
SEQ_LENGTH), with NeMo's checkpoint format in the middle:

  import    the converted BF16 directory -> a NeMo checkpoint {import}/nemo (NeMo's importer, in NeMo's
            container, on one GPU: python -m nemo_backend.hf_import)
  train     TRAIN_RECIPE with backend.name=nemo from that checkpoint (checkpoint.load_format=nemo)
  export    NeMo's checkpoint -> a Hugging Face directory {export}/hf (NeMo's exporter; LoRA merged first;
            rewritten as safetensors with our config, tokenizer and chat template)
  eval      the export answers the test split (our generation, like any Hugging Face directory)

NeMo's trainer, importer and exporter need GPUs (README: "The NeMo backend"); on a CPU cluster only
--dry-run is meaningful.
"""

import os

from launcher.pipeline import Pipeline, Stage
from recipes import sft_pipeline as native

NEMO_IMAGE = os.environ.get("NEMO_IMAGE", "nvcr.io/nvidia/nemo:25.09")


def pipeline() -> Pipeline:
    stages = {s.name: s for s in native.pipeline().stages}
    train = stages["train"]
    overrides = [o for o in train.overrides if not o.startswith(("checkpoint.load", "data.packing"))]
    return Pipeline(
        name="sft-pipeline-nemo",
        stages=[
            stages["convert"],
            stages["data"],
            Stage("import", command=["{python}", "-m", "nemo_backend.hf_import", "{convert}/bf16", "{import}/nemo"],
                  container_image=NEMO_IMAGE, gpus=1),
            Stage("train", recipe=train.recipe, overrides=[
                "backend.name=nemo", f"backend.container_image={NEMO_IMAGE}", "checkpoint.load={import}/nemo",
                "checkpoint.load_format=nemo", "data.packing=false", *overrides]),
            Stage("export", task="export", args=["{train}", "--out", "{export}/hf"]),
            Stage("eval", task="eval", args=["{export}/hf", "--data", "{data}/sft", "--split", "test", "--out", "{eval}/results",
                                             "--max-new-tokens", "16"]),
            Stage("backtest", command=native.BACKTEST),
        ],
    )
