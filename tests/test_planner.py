"""The planner: memory per pipeline rank, FLOPs, the layout search and the fewest nodes (torch-free).

The byte-exact check of weights/grads/optimizer against what the trainer allocates is in
tests/test_trainer.py (test_planned_static_memory_equals_what_the_trainer_allocates)."""

import dataclasses

import pytest

from conftest import run_launch
from launcher import search
from launcher.cluster import load_profile
from launcher.preflight import run_preflight
from launcher.recipe_loader import apply_overrides, load_recipe

NEMO = ["backend.name=nemo", "backend.container_image=nvcr.io/nvidia/nemo:25.09"]
NATIVE = ["backend.name=native", "backend.container_image=null"]


def plan(recipe, nodes, overrides=(), cluster="h100-8x64"):
    r = apply_overrides(load_recipe(recipe)[0], list(overrides))
    prof = dataclasses.replace(load_profile(cluster)[0], nodes=nodes)
    return run_preflight(r, prof)


@pytest.mark.parametrize("backend", [NEMO, NATIVE], ids=["nemo", "native"])
@pytest.mark.parametrize("name, recipe, nodes, overrides, dims", [
    ("pretrain 128x8 TP2 PP16 EP64 SP", "pretrain_671b", 128, [], (2, 16, 64, 1, True)),
    ("full SFT 64x8 TP1 PP8 EP64", "full_ft", 64, [], (1, 8, 64, 1, False)),
    ("LoRA 5x8 TP8 PP5 SP", "lora", 5, ["parallel.pp=5"], (8, 5, 1, 8, True)),
])
def test_nvidia_published_layouts_fit_on_h100_80gb(name, recipe, nodes, overrides, dims, backend):
    p = plan(recipe, nodes, [*overrides, *backend])
    assert p.ok, [str(x) for x in p.errors]
    lay = p.layout
    assert (lay.tp, lay.pp, lay.ep, lay.etp, lay.sp) == dims
    assert p.memory.verdict == "fits", p.memory.summary()


def test_full_sft_on_4_nodes_wont_fit_and_plan_names_the_minimum():
    p = plan("full_ft", 4, cluster="h100-8x4")
    assert not p.ok and p.memory.verdict == "won't fit"
    res = run_launch("plan", "recipes/full_ft.py", "--cluster", "h100-8x4")
    assert res.returncode == 1, res.stderr
    out = res.stdout
    assert "won't fit" in out and "memory per GPU by pipeline rank" in out
    assert "with the recipe's own TP1 PP8 EP64 ETP1: 64 nodes" in out
    fewest = int(out.split("fewest nodes that fit: ")[1].split()[0])
    assert 4 < fewest <= 64


def test_plan_table_has_every_rank_and_the_flops_split():
    res = run_launch("plan", "recipes/pretrain_671b.py", "--cluster", "h100-8x64", "--nodes", "128")
    assert res.returncode == 0, res.stdout + res.stderr
    table = res.stdout.split("memory per GPU by pipeline rank")[1].split("compute")[0].strip().splitlines()[2:]
    assert len(table) == 16 and sum("*" in row.split()[0] for row in table) == 1
    assert "dense" in res.stdout and "attention" in res.stdout and "routed experts" in res.stdout
    assert "tokens/day" in res.stdout


def test_search_ranks_fitting_layouts_by_step_time_with_communication():
    res = run_launch("plan", "recipes/full_ft.py", "--cluster", "h100-8x64", "--search", "--top", "5")
    assert res.returncode == 0, res.stdout + res.stderr
    rows = res.stdout.split("best first")[1].splitlines()[2:7]
    assert rows and all(" fits " in row for row in rows), rows
    times = [float(row.split()[11]) for row in rows]
    assert times == sorted(times)
    assert "fewest nodes that fit: " in res.stdout


def test_search_orders_by_fit_then_step_time():
    r = load_recipe("full_ft_16b")[0]
    cands = search.layouts(r, load_profile("h100-8x4")[0])
    keys = [c.rank_key() for c in cands]
    assert keys == sorted(keys) and cands
    assert all(c.pre.ok for c in cands)
    fitting = [c.step_seconds for c in cands if c.pre.memory.verdict == "fits"]
    assert fitting == sorted(fitting)


def test_expert_all_to_all_across_nodes_and_tp_inside_a_node_no_longer_tie():
    """DeepSeek-V3 full SFT on 64 nodes: TP1 PP8 EP64 (the expert all-to-all crosses the network) and TP8+SP PP8
    (TP traffic inside the node; experts split by TP) get different step times, and the plan says which terms
    differ: EP mostly across nodes in one, TP inside the node and FSDP-gathered experts in the other."""
    from launcher.comm import step_terms
    from launcher.plan import plan_dict

    prof = load_profile("h100-8x64")[0]
    ep = plan("full_ft", 64)
    tp = plan("full_ft", 64, ["parallel.tp=8", "parallel.ep=1", "parallel.etp=8", "parallel.sp=true"])
    assert ep.ok and tp.ok
    r = load_recipe("full_ft")[0]
    r_tp = apply_overrides(r, ["parallel.tp=8", "parallel.ep=1", "parallel.etp=8", "parallel.sp=true"])
    a, b = plan_dict(r, prof, ep)["comm"], plan_dict(r_tp, prof, tp)["comm"]
    assert abs(a["est_step_seconds"] - b["est_step_seconds"]) > 0.1 * min(a["est_step_seconds"], b["est_step_seconds"])
    ta = {x.name: x for x in step_terms(r, ep.layout, 8)}
    tb = {x.name: x for x in step_terms(r_tp, tp.layout, 8)}
    assert "EP" in ta and ta["EP"].inter_bytes > 7 * ta["EP"].intra_bytes  # 8 of 64 EP ranks share a node
    assert "TP" in tb and tb["TP"].inter_bytes == 0 and "EP" not in tb
    res = run_launch("plan", "recipes/full_ft.py", "--cluster", "h100-8x64")
    assert "comm     per step" in res.stdout and " EP " in res.stdout and "step     ~" in res.stdout


@pytest.mark.parametrize("recipe, overrides", [("full_ft_16b", []), ("lora", []), ("full_ft_16b", NEMO)])
def test_fewest_nodes_equals_brute_force(recipe, overrides):
    r = apply_overrides(load_recipe(recipe)[0], overrides)
    prof = load_profile("h100-8x4")[0]
    found = search.fewest_nodes(r, prof, 64)
    assert found is not None
    n = next(n for n in range(1, 65)
             if any(c.pre.memory.verdict == "fits" for c in search.layouts(r, dataclasses.replace(prof, nodes=n))))
    assert found[0] == n


def test_won_t_fit_is_refused_by_launch_unless_ignored(tmp_path):
    res = run_launch("recipes/full_ft.py", "--cluster", "h100-8x4", "parallel.ep=4", "--dry-run", "--runs-dir", str(tmp_path))
    assert res.returncode == 2 and "won't fit" in res.stderr
    res = run_launch("recipes/full_ft.py", "--cluster", "h100-8x4", "parallel.ep=4", "--dry-run", "--ignore-memory",
                     "--runs-dir", str(tmp_path))
    assert res.returncode == 0 and "won't fit" in res.stderr  # the verdict still shows in the summary


def test_plan_bad_input_is_one_line_exit_2():
    res = run_launch("plan", "recipes/full_ft.py", "--cluster", "h100-8x4", "--nodes", "0")
    assert res.returncode == 2 and res.stderr.strip() == "launch: error: --nodes: must be >= 1, got 0"


class _OtherRankCP:
    """CP rank 0 of 2 in one process (trainer.context_parallel.ContextParallel's interface): the gather
    appends a stand-in for the other rank's part, as the real all-gather's output holds both."""

    def __init__(self, seq: int):
        import torch

        from trainer.context_parallel import chunk_index

        self.size, self.index, self.all_index = 2, chunk_index(2 * seq, 2, 0), torch.arange(2 * seq)
        self.segments = self.all_segments = None

    def gather(self, x, dim):
        import torch

        return torch.cat([x, x.detach() + 0], dim)

    def all_reduce(self, x):
        return x.clone()


@pytest.mark.parametrize("recompute,cp", [("none", 1), ("selective", 1), ("full", 1), ("none", 2)])
def test_activation_estimate_matches_the_tensors_the_model_saves(recompute, cp):
    """On CPU: the elements each decoder layer keeps for backward (saved-tensor hooks, parameters
    excluded, each storage once) within 15% of the planner's per-layer activation estimate; under CP2 per
    local token, with the latent gathered and K/V expanded chunk by chunk. (On a GPU the check is against
    torch.cuda.max_memory_allocated; see the issue notes.)"""
    torch = pytest.importorskip("torch")
    from launcher.layout import Layout
    from launcher.memory import _activation_elems_per_token
    from model.presets import deepseek_v3
    from model.transformer import build_model
    from trainer.parallel import apply_activation_checkpointing

    cfg = dataclasses.replace(deepseek_v3(), hidden_size=512, intermediate_size=1024, moe_intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=8, q_lora_rank=192, kv_lora_rank=64,
                              qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
                              num_experts_per_tok=4, first_k_dense_replace=1, n_group=4, topk_group=2, vocab_size=1000)
    torch.manual_seed(0)
    model = build_model(cfg)
    apply_activation_checkpointing(model, recompute)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seq = 512
    x = torch.randint(0, cfg.vocab_size, (1, seq))
    lay = dataclasses.replace(Layout(1, 1, 1, 1, 1, 1, 1, False, 1, 1), cp=cp)
    for name, layer in model.layers.items():
        inputs = {}
        hook = layer.register_forward_pre_hook(lambda m, a: inputs.setdefault("a", a))
        with torch.no_grad():
            model(x)
        hook.remove()
        kept: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params and t.numel() > 1:
                kept[ptr] = max(kept.get(ptr, 0), t.untyped_storage().nbytes() // t.element_size())
            return t

        a = inputs["a"]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(a[0].detach().requires_grad_(True), *a[1:], cp=_OtherRankCP(seq) if cp > 1 else None)
        measured = sum(kept.values()) / seq
        dense, routed = _activation_elems_per_token(cfg, int(name), lay, recompute)
        if recompute == "full":  # the composable checkpoint keeps the layer's inputs (hidden states, rope, mask)
            assert measured <= 2 * cfg.hidden_size and dense == cfg.hidden_size
        else:
            assert abs((dense + routed) / measured - 1) < 0.15, (name, measured, dense + routed)
