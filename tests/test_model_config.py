"""Parameter counts from the torch-free configs equal the published totals (shared/reference)."""

import pytest

from model.presets import PRESETS, preset

PUBLISHED = {  # total (HF meta-device count, no MTP), active per token (rounded as published)
    "deepseek-v3": (671_026_404_352, 37.55e9),
    "deepseek-v2-lite": (15_706_484_224, 2.66e9),
    "moonlight-16b": (15_960_108_544, 2.91e9),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_counts_equal_published(name):
    cfg = preset(name)
    total, active = PUBLISHED[name]
    assert cfg.num_params() == total
    assert round(cfg.num_active_params() / 1e9, 2) == round(active / 1e9, 2)


def test_v3_mtp_module_size():
    # One MTP module: a full MoE layer plus eh_proj and three norms (embedding and head are shared).
    mtp = preset("deepseek-v3").mtp_params().total
    assert 11.5e9 < mtp < 11.7e9
    assert preset("deepseek-v3").num_params(include_mtp=True) == 671_026_404_352 + mtp


def test_seed_moe_shape():
    cfg = preset("moe-5b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.n_routed_experts, cfg.num_experts_per_tok,
            cfg.moe_intermediate_size, cfg.vocab_size) == (1024, 24, 16, 2, 4096, 50257)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(KeyError, match="deepseek-v3"):
        preset("gpt-5")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_split_adds_up(name):
    cfg = preset(name)
    split = cfg.param_split()
    assert split.total == cfg.num_params()
    assert cfg.num_active_params() <= cfg.num_params()


def test_yarn_softmax_scale_v3():
    assert preset("deepseek-v3").softmax_scale() == pytest.approx(0.135234, abs=1e-6)
    assert preset("moonlight-16b").softmax_scale() == pytest.approx(192**-0.5)  # no YaRN


def test_hf_config_absent_routing_keys_take_the_model_types_defaults():
    from model.hf_config import config_from_hf

    shape = {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "n_routed_experts": 8,
             "num_experts_per_tok": 2, "n_group": None, "topk_group": None}
    v2 = config_from_hf({**shape, "model_type": "deepseek_v2"})
    assert (v2.scoring_func, v2.topk_method, v2.n_group, v2.topk_group, v2.norm_topk_prob, v2.routed_scaling_factor,
            v2.first_k_dense_replace) == ("softmax", "greedy", 1, 1, False, 1.0, 0)
    v3 = config_from_hf({**shape, "model_type": "deepseek_v3"})
    assert (v3.scoring_func, v3.topk_method, v3.n_group, v3.topk_group, v3.norm_topk_prob, v3.routed_scaling_factor,
            v3.first_k_dense_replace) == ("sigmoid", "noaux_tc", 8, 4, True, 2.5, 3)
    assert config_from_hf({**shape, "model_type": "deepseek_v3", "scoring_func": "softmax"}).scoring_func == "softmax"
    # transformers' DeepseekV2 router never renormalises, whatever the file says
    with pytest.warns(UserWarning, match="norm_topk_prob"):
        assert not config_from_hf({**shape, "model_type": "deepseek_v2", "norm_topk_prob": True}).norm_topk_prob
