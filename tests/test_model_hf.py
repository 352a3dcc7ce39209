"""Our DeepSeek-V3 implementation against Hugging Face transformers' DeepseekV3ForCausalLM and, for V2-family
config.json files, DeepseekV2ForCausalLM (fp32, CPU).

Weights are written by HF's save_pretrained and read through our HF import, so the test covers the
checkpoint mapping as well as the numerics.
"""

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (AutoConfig, AutoModelForCausalLM, DeepseekV2Config, DeepseekV2ForCausalLM,  # noqa: E402
                          DeepseekV3Config, DeepseekV3ForCausalLM)

from model.config import RopeScaling  # noqa: E402
from model.hf_config import config_from_hf, config_to_hf, load_config  # noqa: E402
from model.hf_io import load_hf_model, save_hf, load_hf_weights  # noqa: E402
from model.moe import MoE  # noqa: E402
from model.presets import PRESETS, preset  # noqa: E402
from model.transformer import IGNORE_INDEX, build_model  # noqa: E402

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
            n_group=2, topk_group=1, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
            q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            max_position_embeddings=256, rms_norm_eps=1e-6)

VARIANTS = {
    # q low-rank path, group-limited routing (2 groups, keep 1), YaRN without mscale (cos/sin scaled)
    "qlora-groups-yarn": dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}),
    # V2-Lite-style attention (no q low-rank), no groups, plain RoPE
    "no-qlora-plain-rope": dict(q_lora_rank=None, n_group=1, topk_group=1, rope_parameters={"rope_type": "default", "rope_theta": 50000.0}),
    # V3-style YaRN (mscale = mscale_all_dim = 1: softmax scale changes), 4 groups keep 2, top-3, 2 dense layers
    "v3-yarn-mscale": dict(n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=2, num_hidden_layers=4,
                           rope_parameters={"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0,
                                            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}),
    # top-1 with norm_topk_prob: V3 renormalises for any k, so each token's routed weight is routed_scaling_factor
    "top1-norm": {"num_experts_per_tok": 1, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
}


def make_pair(tmp_path, variant, seed=0):
    torch.manual_seed(seed)
    cfg = DeepseekV3Config(**{**BASE, **VARIANTS[variant]})
    hf = DeepseekV3ForCausalLM._from_config(cfg, attn_implementation="eager").float()
    with torch.no_grad():  # nonzero correction bias, so biased choice differs from unbiased weights
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.rand_like(buf) * 0.5)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_model(tmp_path / "hf", dtype=torch.float32)
    return hf, ours


def batch(seed=1, b=2, s=24, vocab=128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    return ids, labels


def hf_name(ours_name, cfg):
    """HF in-memory parameter name for one of ours (experts fused as gate_up_proj there)."""
    name = "lm_head.weight" if ours_name.startswith("lm_head") else "model." + ours_name
    for proj in ("gate_proj", "up_proj"):
        if name.endswith(f"mlp.experts.{proj}"):
            return name.replace(f"experts.{proj}", "experts.gate_up_proj"), proj
    return name, None


def assert_logits_loss_and_grads_match(hf, ours):
    ids, labels = batch()
    hf_out = hf(input_ids=ids, labels=ids)
    our_out = ours(ids, labels=labels)
    assert (our_out.logits - hf_out.logits).abs().max().item() <= 1e-5
    assert abs(our_out.loss.item() - hf_out.loss.item()) <= 1e-5
    hf_out.loss.backward()
    our_out.loss.backward()
    hf_params = dict(hf.named_parameters())
    inter = hf.config.moe_intermediate_size
    checked = 0
    for name, p in ours.named_parameters():
        key, part = hf_name(name, hf.config)
        ref = hf_params[key].grad
        if part == "gate_proj":
            ref = ref[:, :inter]
        elif part == "up_proj":
            ref = ref[:, inter:]
        assert p.grad is not None and ref is not None, name
        diff = (p.grad - ref).abs().max().item()
        assert diff <= 1e-5, f"{name}: grad differs by {diff}"
        checked += 1
    assert checked == len(list(ours.parameters()))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_loss_and_grads_match_hf(tmp_path, variant):
    assert_logits_loss_and_grads_match(*make_pair(tmp_path, variant))


V2_BASE = {k: v for k, v in BASE.items() if k not in ("n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor")}
V2_VARIANTS = {
    # V2-Lite-style: greedy softmax routing; routing keys left out of config.json take DeepseekV2Config's defaults
    # (softmax, greedy, no groups, no renormalisation, routed_scaling_factor 1)
    "lite-defaults": {"q_lora_rank": None},
    # V2-style: q low-rank path, group-limited greedy (2 groups, keep 1), scaled weights
    "group-limited": {"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1, "routed_scaling_factor": 16.0},
}
V2_ROUTING_DEFAULTS = {"topk_method": "greedy", "n_group": None, "topk_group": None, "norm_topk_prob": False,
                       "routed_scaling_factor": 1.0}


@pytest.mark.parametrize("variant", sorted(V2_VARIANTS))
def test_v2_config_without_scoring_func_matches_hf(tmp_path, variant):
    """A deepseek_v2 config.json has no scoring_func (transformers' DeepseekV2 router is softmax): read as V2."""
    torch.manual_seed(0)
    hf = DeepseekV2ForCausalLM._from_config(DeepseekV2Config(**{**V2_BASE, **V2_VARIANTS[variant]}), attn_implementation="eager").float()
    with torch.no_grad():  # sharper routing than the init's, so weights (and their normalisation) matter
        for name, p in hf.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    hf.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    written = json.loads(path.read_text())
    written = {k: v for k, v in written.items() if not (k in V2_ROUTING_DEFAULTS and v == V2_ROUTING_DEFAULTS[k])}
    path.write_text(json.dumps(written))
    assert written["model_type"] == "deepseek_v2" and "scoring_func" not in written
    ours = load_hf_model(tmp_path / "hf", dtype=torch.float32)
    assert (ours.cfg.scoring_func, ours.cfg.norm_topk_prob) == ("softmax", False)
    assert ours.cfg.routed_scaling_factor == hf.config.routed_scaling_factor
    assert ours.cfg.topk_method == hf.config.topk_method
    assert_logits_loss_and_grads_match(hf, ours)


V2_EXPORTS = {
    # the preset: V2-Lite-style attention (no q low-rank), greedy softmax routing, plain RoPE
    "tiny-v2": {},
    # q low-rank path, group-limited greedy (2 groups, keep 1), scaled weights, V2-Lite-style YaRN (mscale 0.707)
    "group-limited-yarn": dict(q_lora_rank=32, topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=16.0,
                               rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=256, mscale=0.707, mscale_all_dim=0.707)),
}


@pytest.mark.parametrize("variant", sorted(V2_EXPORTS))
def test_v2_family_export_loads_in_hf_as_deepseek_v2(tmp_path, variant):
    """Our softmax-routed model, exported, is DeepseekV2 in transformers (not V3's sigmoid router), with every
    tensor accounted for and the same logits, loss and gradients; our importer reads the same ModelConfig back."""
    cfg = dataclasses.replace(preset("tiny-v2"), **V2_EXPORTS[variant])
    ours = build_model(cfg, seed=0)
    with torch.no_grad():  # sharper routing than the init's, so the choice of experts and their weights matter
        for name, p in ours.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    save_hf(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (written["model_type"], written["architectures"]) == ("deepseek_v2", ["DeepseekV2ForCausalLM"])
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager", dtype=torch.float32,
                                                    output_loading_info=True)
    assert type(hf) is DeepseekV2ForCausalLM
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"] or info["error_msgs"]), info
    assert (hf.config.topk_method, hf.config.q_lora_rank) == (cfg.topk_method, cfg.q_lora_rank)
    assert_logits_loss_and_grads_match(hf, ours)
    assert load_config(tmp_path / "ours") == dataclasses.replace(cfg, name="ours")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_configs_export_to_their_hf_model_type(tmp_path, name):
    """Every preset's config.json round-trips through our importer and loads in transformers as its family."""
    cfg = preset(name)
    hf = config_to_hf(cfg)
    assert hf["model_type"] == {"sigmoid": "deepseek_v3", "softmax": "deepseek_v2"}[cfg.scoring_func]
    assert config_from_hf(hf, name=cfg.name) == cfg
    (tmp_path / "config.json").write_text(json.dumps(hf))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is {"deepseek_v3": DeepseekV3Config, "deepseek_v2": DeepseekV2Config}[hf["model_type"]]
    assert (loaded.q_lora_rank, loaded.routed_scaling_factor, loaded.n_group, loaded.topk_group) == (
        cfg.q_lora_rank, cfg.routed_scaling_factor, cfg.n_group, cfg.topk_group)


@pytest.mark.parametrize("change, field", [
    (dict(preset="tiny-v2", norm_topk_prob=True), "norm_topk_prob"),  # transformers' DeepseekV2 never renormalises
    (dict(preset="tiny-v2", topk_method="noaux_tc"), "topk_method"),  # softmax with a correction bias: no HF class
    (dict(preset="tiny", topk_method="greedy"), "topk_method"),  # DeepseekV3 routes sigmoid with noaux_tc only
    (dict(preset="tiny", scoring_func="sqrtsoftplus"), "scoring_func"),
])
def test_export_refuses_routing_transformers_cannot_express(tmp_path, change, field):
    change = dict(change)
    cfg = dataclasses.replace(preset(change.pop("preset")), **change)
    with pytest.raises(ValueError, match=field):
        config_to_hf(cfg)
    with pytest.raises(ValueError, match=field):  # before any shard is written
        save_hf(build_model(cfg, device="meta"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_router_choices_match_hf(tmp_path, variant):
    hf, ours = make_pair(tmp_path, variant)
    seen = {}

    def grab(name):
        def hook(module, args, output):
            seen[name] = (args[0].detach().reshape(-1, args[0].shape[-1]), output)
        return hook

    for name, mod in hf.named_modules():
        if type(mod).__name__ == "DeepseekV3TopkRouter":
            mod.register_forward_hook(grab(name.replace("model.", "")))
    ids, _ = batch(seed=3)
    with torch.no_grad():
        hf(input_ids=ids)
    assert seen
    for name, (x, (_, hf_w, hf_idx)) in seen.items():
        gate = ours.get_submodule(name)
        w, idx, _ = gate(x)
        order_h, order_o = hf_idx.sort(-1), idx.sort(-1)
        assert torch.equal(order_h.values, order_o.values), name
        assert (hf_w.gather(1, order_h.indices) - w.gather(1, order_o.indices)).abs().max() <= 1e-6


def test_hf_round_trip_is_identical(tmp_path):
    _, ours = make_pair(tmp_path, "qlora-groups-yarn")
    save_hf(ours, tmp_path / "ours", max_shard_bytes=40_000)  # several shards
    again = load_hf_model(tmp_path / "ours")
    a, b = ours.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and transformers reads our export back to the same logits
    hf2 = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager", dtype=torch.float32)
    ids, _ = batch()
    assert (hf2(input_ids=ids).logits - ours(ids).logits).abs().max() <= 1e-5


def test_mismatched_checkpoint_lists_problems(tmp_path):
    hf, ours = make_pair(tmp_path, "no-qlora-plain-rope")
    cfg = ours.cfg
    from model.transformer import build_model
    import dataclasses
    wrong = build_model(dataclasses.replace(cfg, q_lora_rank=32, kv_lora_rank=8), seed=0)
    with pytest.raises(ValueError) as exc:
        load_hf_weights(wrong, tmp_path / "hf")
    msg = str(exc.value)
    assert "missing" in msg and "q_a_proj" in msg and "unexpected" in msg and "q_proj" in msg and "mis-shaped" in msg and "kv_a_proj_with_mqa" in msg


def test_partial_load_reads_only_local_experts(tmp_path):
    """A rank holding experts 4..7 of each MoE layer gets exactly those."""
    _, ours = make_pair(tmp_path, "qlora-groups-yarn")
    from model.transformer import build_model
    part = build_model(ours.cfg, seed=1)
    for name, mod in part.named_modules():
        if isinstance(mod, MoE):
            from model.moe import GroupedExperts
            mod.experts = GroupedExperts(4, ours.cfg.hidden_size, ours.cfg.moe_intermediate_size, first_expert=4)
    load_hf_weights(part, tmp_path / "hf")  # the other experts belong to other ranks: not unexpected
    for name, mod in part.named_modules():
        if isinstance(mod, MoE):
            full = ours.get_submodule(name).experts
            assert torch.equal(mod.experts.down_proj, full.down_proj[4:8])
