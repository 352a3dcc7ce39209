"""A three-stage pipeline on the smoke recipe: prepare data -> train -> evaluate.

  launch recipes/smoke_pipeline.py --cluster local-slurm

Each stage is its own job (on Slurm: afterok on the previous one; a failed stage cancels the rest)
with its own run directory. ``{prepare}``, ``{train}``: those stages' run directories.
"""

from launcher.pipeline import Pipeline, Stage


def pipeline() -> Pipeline:
    return Pipeline(
        name="smoke-pipeline",
        stages=[
            # writes training/validation/test.jsonl (stands in for a conversion step such as moe-convert-fp8)
            Stage("prepare", command=["{python}", "-m", "trainer.smoke_data", "{prepare}/data"]),
            Stage("train", recipe="smoke", overrides=["data.path={prepare}/data", "train.max_steps=20"]),
            Stage("eval", command=["{python}", "-m", "trainer.evaluate", "--run-dir", "{train}", "--split", "validation"]),
        ],
    )
