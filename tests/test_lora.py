"""LoRA adapters (trainer/lora.py) on the tiny presets, CPU."""

import copy

import pytest
import torch
from torch import nn

from launcher.memory import lora_params
from launcher.recipe import Peft
from model.presets import preset
from model.transformer import IGNORE_INDEX, build_model
from trainer.lora import LoRALinear, apply_lora, count_lora_params, init_lora, lora_state_dict, merge_lora

V3_TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft(targets=V3_TARGETS, rank=4, alpha=8.0, dropout=0.0):
    return Peft(method="lora", rank=rank, alpha=alpha, dropout=dropout, targets=list(targets))


def batch(cfg, b=2, s=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=gen)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    return ids, labels


def is_adapter(name):
    return ".lora_A." in name or ".lora_B." in name


@pytest.fixture(scope="module")
def tiny_base():
    return build_model(preset("tiny"), seed=0)


def test_starts_equal_to_base_and_trains_only_adapters(tiny_base):
    cfg = tiny_base.cfg
    model = copy.deepcopy(tiny_base)
    names = apply_lora(model, peft(), seed=0)
    assert names and all(n.startswith("layers.") for n in names)
    ids, labels = batch(cfg)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_base(ids).logits)  # B = 0

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if is_adapter(n)}
    assert len(trainable) == 2 * len(names)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(ids, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    for k, v in model.state_dict().items():
        if is_adapter(k):
            assert not torch.equal(v, before[k]), f"{k} did not train"
        else:
            assert torch.equal(v, before[k]), f"frozen tensor {k} changed"


@pytest.mark.parametrize("name,targets", [("tiny", V3_TARGETS), ("tiny", ["q_a_proj", "o_proj"]), ("tiny-v2", ["q_proj"]),
                                          ("tiny-v2", ["q_proj", "kv_b_proj", "gate_proj", "up_proj", "down_proj"])])
def test_adapter_count_matches_planner(name, targets):
    cfg = preset(name)
    model = build_model(cfg, device="meta")
    apply_lora(model, peft(targets, rank=8))
    expected = lora_params(cfg, list(range(cfg.num_hidden_layers)), targets, 8)
    assert count_lora_params(model) == expected
    assert sum(t.numel() for t in lora_state_dict(model).values()) == expected
    # no adapters on MTP modules, routed experts, routers or the head
    assert all(k.startswith("layers.") for k in lora_state_dict(model))
    assert not any(isinstance(m, LoRALinear) for m in model.mtp.modules())


def test_state_dict_keys_and_merge(tiny_base, tmp_path):
    cfg = tiny_base.cfg
    model = copy.deepcopy(tiny_base)
    names = apply_lora(model, peft(), seed=1)
    base_keys = set(tiny_base.state_dict())
    keys = set(model.state_dict())
    assert base_keys <= keys
    assert keys - base_keys == set(lora_state_dict(model))
    assert set(lora_state_dict(model)) == {f"{n}.lora_{x}.weight" for n in names for x in "AB"}
    assert model.get_submodule(names[0]).lora_A.weight.shape == (4, model.get_submodule(names[0]).in_features)
    with torch.no_grad():
        for n in names:  # a non-trivial update
            model.get_submodule(n).lora_B.weight.normal_(0.0, 0.05)
        ids, _ = batch(cfg, seed=1)
        adapted = model(ids).logits

    assert merge_lora(model) == names
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(model.get_submodule(n)) is nn.Linear for n in names)
    assert set(model.state_dict()) == base_keys
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=0)

    from model.hf_io import load_hf_model, save_hf

    save_hf(model, tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(load_hf_model(tmp_path / "merged")(ids).logits, adapted, atol=1e-5, rtol=0)


def test_meta_device_flow(tiny_base):
    cfg = tiny_base.cfg
    model = build_model(cfg, device="meta")
    apply_lora(model, peft(), seed=3)
    assert all(t.is_meta for t in lora_state_dict(model).values())
    model.to_empty(device="cpu")
    model.init_weights(0)
    init_lora(model, 3)
    ids, labels = batch(cfg)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_base(ids).logits)
    # the same adapters as applying LoRA to a materialised model with the same seed
    eager = copy.deepcopy(tiny_base)
    apply_lora(eager, peft(), seed=3)
    for k, v in lora_state_dict(eager).items():
        assert torch.equal(lora_state_dict(model)[k], v), k
    other = copy.deepcopy(tiny_base)
    apply_lora(other, peft(), seed=4)
    assert not torch.equal(lora_state_dict(other)["layers.0.self_attn.q_a_proj.lora_A.weight"],
                           lora_state_dict(eager)["layers.0.self_attn.q_a_proj.lora_A.weight"])
    model(ids, labels).loss.backward()  # trains
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_dropout_only_in_training(tiny_base):
    model = copy.deepcopy(tiny_base)
    names = apply_lora(model, peft(["o_proj"], dropout=0.5), seed=0)
    with torch.no_grad():
        for n in names:
            model.get_submodule(n).lora_B.weight.normal_(0.0, 0.1)
    ids, _ = batch(tiny_base.cfg)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(ids).logits, model(ids).logits)
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)


def test_bad_configs():
    model = build_model(preset("tiny"), device="meta")
    with pytest.raises(ValueError, match="q_projj"):
        apply_lora(model, peft(["q_a_proj", "q_projj"]))
    with pytest.raises(ValueError, match="q_proj"):  # V3 has the low-rank q path, no q_proj
        apply_lora(model, peft(["q_proj"]))
    with pytest.raises(ValueError, match="method"):
        apply_lora(model, Peft(method="none"))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    apply_lora(model, peft())
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, peft())
