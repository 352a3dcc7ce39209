"""Pre-flight checks: every problem at once, each naming its field, with a valid alternative."""

import dataclasses

import pytest

from launcher.cluster import load_profile
from launcher.preflight import run_preflight
from launcher.recipe_loader import apply_overrides, load_recipe
from launcher.suggest import min_nodes, suggestions


def pre(recipe="smoke", cluster="local", overrides=()):
    r, _ = load_recipe(recipe)
    return run_preflight(apply_overrides(r, list(overrides)), load_profile(cluster)[0])


def fields(p, severity="error"):
    return {x.field for x in p.problems if x.severity == severity}


def test_full_ft_fits_on_64_nodes():
    p = pre("full_ft", "h100-8x64")
    assert p.ok, p.problems
    assert (p.layout.tp, p.layout.pp, p.layout.ep, p.layout.dp, p.layout.edp) == (1, 8, 64, 64, 1)
    assert p.memory.verdict in ("fits", "at risk")


def test_full_ft_refused_on_4_nodes_with_every_reason_and_suggestions():
    p = pre("full_ft", "h100-8x4")
    assert not p.ok
    assert {"parallel.ep", "memory"} <= fields(p)
    ep = next(x for x in p.errors if x.field == "parallel.ep")
    assert "valid EP here: 1, 2, 4" in ep.message
    r, path = load_recipe("full_ft")
    hints = "\n".join(suggestions(r, path, load_profile("h100-8x4")[0]))
    assert "at least 64 nodes" in hints
    assert "--cluster h100-8x64" in hints
    assert "recipes/lora.py" in hints and "recipes/full_ft_16b.py" in hints


def test_lora_derives_pipeline_on_4_nodes():
    # native (FSDP2): frozen bf16 weights are sharded over DP too, so no pipeline is needed
    p = pre("lora", "h100-8x4")
    assert p.ok, p.problems
    assert (p.layout.tp, p.layout.sp, p.layout.ep, p.layout.etp, p.layout.pp, p.layout.dp) == (8, True, 1, 8, 1, 4)
    assert p.memory.verdict == "fits"
    # NeMo (Megatron): weights are replicated over DP, so 671B needs pipeline stages: PP4 is the fewest that fit
    p = pre("lora", "h100-8x4", ["backend.name=nemo", "backend.container_image=nvcr.io/nvidia/nemo:25.09"])
    assert p.ok, p.problems
    assert p.layout.pp == 4 and "pp" in p.layout.derived and p.memory.verdict == "fits"


def test_16b_full_ft_fits_4_nodes():
    p = pre("full_ft_16b", "h100-8x4")
    assert p.ok, p.problems
    assert p.layout.dp == 32 and p.layout.edp == 4


def test_min_nodes_for_full_ft():
    r, _ = load_recipe("full_ft")
    assert min_nodes(r, load_profile("h100-8x4")[0]) == 64


@pytest.mark.parametrize("overrides, field, words", [
    (["parallel.tp=3"], "parallel.tp", "must divide the 4 attention heads; valid: 1, 2"),
    (["parallel.ep=3"], "parallel.ep", "must divide the 8 routed experts"),
    (["parallel.ep=4"], "parallel.ep", "must divide the 2 GPUs of each pipeline stage"),
    (["parallel.pp=3"], "parallel", "does not divide the 2 GPUs"),
    (["parallel.sp=true"], "parallel.sp", "needs TP > 1"),
    (["train.global_batch_size=15"], "train.global_batch_size", "try 8 or 16"),
    (["parallel.vpp=2"], "parallel.vpp", "needs pipeline parallelism"),
    (["parallel.pp_schedule=interleaved_1f1b"], "parallel.vpp", "needs VPP >= 2"),
    (["parallel.cp=2", "data.seq_length=126", "parallel.ep=1"], "data.seq_length", "2*CP"),
    (["parallel.cp=2", "parallel.ep=1", "data.seq_length=126"], "data.seq_length", "nearest valid: 124 or 128"),
    (["parallel.dp=4"], "parallel.dp", "gives DP=2"),
    (["peft.method=lora", "peft.targets=[q_proj,wq]"], "peft.targets", "valid: kv_a_proj_with_mqa"),
    (["parallel.ep=2", "model=tiny", "model.n_routed_experts=0"], "parallel.ep", "no routed experts"),
    (["backend.name=nemo"], "backend.name", "trains on GPUs only"),
    (["data.path=/nonexistent/sft"], "data.path", "does not exist"),
])
def test_each_check_names_its_field(overrides, field, words):
    p = pre("smoke", "local", overrides)
    hits = [x for x in p.errors if x.field == field]
    assert hits and any(words in x.message for x in hits), p.problems


def test_layers_cannot_fill_stages():
    p = pre("smoke", "local", ["parallel.pp=2", "parallel.ep=1", "model.num_hidden_layers=1"])
    assert any(x.field == "parallel.pp" and "cannot fill" in x.message for x in p.errors)


def test_sequence_parallel_length_vs_tp():
    p = pre("smoke", "local", ["parallel.tp=2", "parallel.sp=true", "parallel.ep=1", "data.seq_length=127", "train.micro_batch_size=1", "train.global_batch_size=4"])
    assert any(x.field == "data.seq_length" and "divisible by TP 2" in x.message for x in p.errors)


def test_all_problems_reported_at_once():
    """Every layout problem at once; every wrong value at once (wrong values first: layout arithmetic on a
    zero or a bad choice would only add noise)."""
    p = pre("smoke", "local", ["parallel.tp=3", "parallel.ep=3", "train.global_batch_size=15"])
    assert {"parallel.tp", "parallel.ep"} <= fields(p)
    p = pre("smoke", "local", ["parallel.tp=3", "train.precision=fp16", "train.lr=0", "train.micro_batch_size=0"])
    assert fields(p) == {"train.precision", "train.lr", "train.micro_batch_size"} and p.layout is None


def test_tp_across_nodes_is_a_warning():
    r, _ = load_recipe("smoke")
    prof = dataclasses.replace(load_profile("local")[0], nodes=2, gpus_per_node=2)
    p = run_preflight(apply_overrides(r, ["parallel.tp=4", "parallel.ep=1", "train.global_batch_size=4", "train.micro_batch_size=4"]), prof)
    assert "parallel.tp" in fields(p, "warning") and "crosses node" in str(p.problems)


def test_uneven_pipeline_warns():
    p = pre("full_ft", "h100-8x64")
    assert any(x.field == "parallel.pp" and "uneven" in x.message for x in p.warnings)


def test_memory_check_can_be_skipped():
    over = ["model=moonlight-16b", "parallel.ep=2", "data.seq_length=64"]
    assert "memory" in fields(pre("smoke", "local", over))
    r, _ = load_recipe("smoke")
    p = run_preflight(apply_overrides(r, over), load_profile("local")[0], memory_check=False)
    assert "memory" not in fields(p)


def test_unset_dims_derived_for_smoke():
    p = pre("smoke", "local", ["parallel.ep=null", "parallel.tp=null", "parallel.pp=null"])
    assert p.ok and p.layout.dp == 2 and p.layout.tp == 1 and p.layout.pp == 1 and p.layout.ep == 2
    assert set(p.layout.derived) >= {"tp", "pp", "ep"}
