"""A pipeline on the smoke recipe: prepare data -> train -> evaluate the answers -> export to Hugging Face.

  launch recipes/smoke_pipeline.py --cluster local-slurm

Each stage is its own job (on Slurm: afterok on the previous one; a failed stage cancels the rest)
with its own run directory. ``{prepare}``, ``{train}``: those stages' run directories. The eval and
export stages are `launch eval` / `launch export` of the train stage's newest checkpoint: their
results land in the train stage's run directory (eval/validation-step-20/, export/hf-step-20/).
"""

from launcher.pipeline import Pipeline, Stage


def pipeline() -> Pipeline:
    return Pipeline(
        name="smoke-pipeline",
        stages=[
            # writes training/validation/test.jsonl (stands in for a conversion step such as moe-convert-fp8)
            Stage("prepare", command=["{python}", "-m", "trainer.smoke_data", "{prepare}/data"]),
            Stage("train", recipe="smoke", overrides=["data.path={prepare}/data", "train.max_steps=20"]),
            Stage("eval", task="eval", args=["{train}", "--split", "validation", "--max-new-tokens", "8"]),
            Stage("export", task="export", args=["{train}"]),
        ],
    )
