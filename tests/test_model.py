"""Our model on its own: sizes on the meta device, dtypes, MTP, packing, routing and balancing."""

import dataclasses

import pytest
import torch

from model.moe import AuxLossGrad, GroupedExperts, MoE, Router, imbalance, update_expert_bias
from model.presets import PRESETS, preset
from model.transformer import IGNORE_INDEX, build_model


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_meta_build_matches_config_param_count(name):
    cfg = preset(name)
    model = build_model(cfg, device="meta")
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params(include_mtp=True)


def _batch(cfg, b=2, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = IGNORE_INDEX
    return ids, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["tiny", "tiny-v2"])
def test_forward_backward_dtypes(name, dtype):
    cfg = preset(name)
    model = build_model(cfg, dtype=dtype, seed=0)
    ids, labels = _batch(cfg)
    out = model(ids, labels=labels)
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    assert abs(out.lm_loss.item() - torch.log(torch.tensor(float(cfg.vocab_size))).item()) < 0.5  # near-uniform at init
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if cfg.num_nextn_predict_layers:
        assert out.mtp_loss is not None and torch.allclose(out.loss, out.lm_loss + 0.1 * out.mtp_loss)


def test_packed_sequences_do_not_see_each_other():
    cfg = preset("tiny")
    model = build_model(cfg, seed=0)
    a, _ = _batch(cfg, b=1, s=16, seed=1)
    b, _ = _batch(cfg, b=1, s=16, seed=2)
    packed = torch.cat([a, b], dim=1)
    seg = torch.tensor([[0] * 16 + [1] * 16])
    pos = torch.cat([torch.arange(16), torch.arange(16)])[None]
    with torch.no_grad():
        together = model(packed, position_ids=pos, segment_ids=seg).logits
        alone = torch.cat([model(a).logits, model(b).logits], dim=1)
    assert (together - alone).abs().max() < 1e-5


def test_grouped_mm_equals_per_expert_loop():
    torch.manual_seed(0)
    experts = GroupedExperts(4, 32, 16)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(20, 32)
    counts = torch.tensor([5, 0, 9, 6])
    fast = experts(x, counts)
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        chunk = x[start:start + n]
        start += n
        outs.append((torch.nn.functional.silu(chunk @ experts.gate_proj[e].t()) * (chunk @ experts.up_proj[e].t())) @ experts.down_proj[e].t())
    assert torch.allclose(fast, torch.cat(outs), atol=1e-6)


def test_softmax_greedy_router():
    cfg = preset("tiny-v2")
    router = Router(cfg)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(10, cfg.hidden_size)
    w, ids, scores = router(x)
    ref = torch.softmax(x @ router.weight.t(), -1).topk(cfg.num_experts_per_tok)
    assert torch.equal(ids.sort(-1).values, ref.indices.sort(-1).values)
    assert torch.allclose(w.sort(-1).values, ref.values.sort(-1).values)


def test_group_limited_sigmoid_router_respects_groups_and_bias():
    cfg = dataclasses.replace(preset("tiny"), n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=2)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(50, cfg.hidden_size)
    _, ids, _ = router(x)
    assert all(len(set((row // 2).tolist())) == 1 for row in ids)  # experts of one group per token
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.tensor([0, 0, 0, 0, 0, 0, 5.0, 5.0]))
    _, ids, _ = router(x)
    assert (ids.sort(-1).values == torch.tensor([6, 7])).all()  # the bias steers the choice ...
    w, _, scores = router(x)
    assert torch.allclose(w.sum(-1), torch.full((50,), cfg.routed_scaling_factor))  # ... weights stay unbiased, renormalised


def test_expert_bias_update_moves_against_load():
    cfg = preset("tiny")
    model = build_model(cfg, seed=0)
    ids, _ = _batch(cfg)
    with torch.no_grad():
        model(ids)
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    load = moe.tokens_per_expert.clone()
    assert load.sum() == ids.numel() * cfg.num_experts_per_tok
    loads = update_expert_bias(model, rate=0.01)
    assert torch.equal(loads[0], load)
    bias = moe.gate.e_score_correction_bias
    assert imbalance(loads) >= 1.0
    assert (bias[load > load.mean()] < 0).all() and (bias[load < load.mean()] > 0).all()
    assert moe.tokens_per_expert.sum() == 0


def test_sequence_aux_loss_reaches_router():
    cfg = dataclasses.replace(preset("tiny"), aux_loss_alpha=0.01, num_nextn_predict_layers=0)
    ids, labels = _batch(cfg)
    grads = {}
    for alpha in (0.0, 0.01):
        model = build_model(dataclasses.replace(cfg, aux_loss_alpha=alpha), seed=0)
        model(ids, labels=labels).loss.backward()
        grads[alpha] = next(m for m in model.modules() if isinstance(m, Router)).weight.grad.clone()
    assert not torch.allclose(grads[0.0], grads[0.01])
    assert AuxLossGrad.scale == 1.0


def test_seeded_init_is_reproducible():
    cfg = preset("tiny")
    a, b = build_model(cfg, seed=3), build_model(cfg, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_mtp_checkpoint_round_trip_in_hub_layout(tmp_path):
    """MTP modules go to model.layers.<L + k> with their own embedding/head copies, as DeepSeek publishes."""
    import json

    from model.hf_io import load_hf_model, save_hf

    cfg = preset("tiny")
    model = build_model(cfg, seed=0)
    save_hf(model, tmp_path)
    keys = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    L = cfg.num_hidden_layers
    for k in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight", "shared_head.head.weight",
              "embed_tokens.weight", "self_attn.q_a_proj.weight", "mlp.experts.7.down_proj.weight"):
        assert f"model.layers.{L}.{k}" in keys
    again = load_hf_model(tmp_path)
    assert len(again.mtp) == 1
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
