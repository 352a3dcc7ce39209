"""Generation with MLA's compressed cache and answer evaluation.

Greedy decoding with the cache gives exactly the tokens of decoding without one and of transformers'
generate(do_sample=False) on the same weights; EP2 and TP2 give exactly what one process gives;
`launch eval` writes one results.csv row per test example (metadata carried over) and summary.json.
"""

import csv
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from generation.decode import generate  # noqa: E402
from generation.loading import load_model  # noqa: E402
from model.hf_config import load_config  # noqa: E402

STOP, PAD = 2, 0


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random transformers DeepseekV3 (YaRN, groups, nonzero routing bias) and our model on its weights."""
    torch.manual_seed(0)
    cfg = DeepseekV3Config(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
                           num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=32,
                           kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256,
                           rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0},
                           initializer_range=0.1, bos_token_id=1, eos_token_id=STOP, pad_token_id=PAD)
    hf = DeepseekV3ForCausalLM._from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.rand_like(buf) * 0.5)
    path = tmp_path_factory.mktemp("gen") / "hf"
    hf.save_pretrained(path)
    ours, _ = load_model(load_config(path), hf_dir=path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 17, 11, 1)]  # different lengths: left padding
    return hf, ours, prompts


def hf_generate(hf, prompts, new):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=STOP, pad_token_id=PAD)
    rows = [o[width:].tolist() for o in out]
    return [r[:r.index(STOP) + 1] if STOP in r else r for r in rows]


def test_cached_greedy_equals_uncached_and_transformers(hf_pair):
    hf, ours, prompts = hf_pair
    cached, cache = generate(ours, prompts, 40, [STOP], PAD)
    uncached = []
    for p in prompts:  # the whole sequence through the model at every step, one prompt at a time
        seq, new = list(p), []
        while len(new) < 40 and (not new or new[-1] != STOP):
            with torch.no_grad():
                new.append(int(ours(torch.tensor([seq])).logits[0, -1].argmax()))
            seq.append(new[-1])
        uncached.append(new)
    assert cached == uncached
    assert cached == hf_generate(hf, prompts, 40)
    assert any(len(c) > 20 for c in cached)  # long enough to mean something


def test_cache_holds_the_latent_only(hf_pair, tmp_path):
    hf, ours, prompts = hf_pair
    cfg = ours.cfg
    hf.save_pretrained(tmp_path / "hf")
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        model, _ = load_model(cfg, hf_dir=tmp_path / "hf", dtype=dtype)
        _, cache = generate(model, prompts, 3, [STOP], PAD)
        assert cache.bytes_per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * size
        assert cache.data.dtype == dtype and cache.data.numel() == cache.bytes_per_token // size * len(prompts) * cache.max_len


def test_sampling_is_seeded_and_top_p_keeps_the_head(hf_pair):
    _, ours, prompts = hf_pair
    gens = lambda: [torch.Generator().manual_seed(s) for s in range(len(prompts))]  # noqa: E731
    a, _ = generate(ours, prompts, 12, [STOP], PAD, temperature=0.9, top_p=0.9, generators=gens())
    b, _ = generate(ours, prompts, 12, [STOP], PAD, temperature=0.9, top_p=0.9, generators=gens())
    assert a == b
    greedy, _ = generate(ours, prompts, 12, [STOP], PAD)
    narrow, _ = generate(ours, prompts, 12, [STOP], PAD, temperature=1.0, top_p=1e-6, generators=gens())
    assert narrow == greedy  # a top-p mass that small keeps only the most likely token


def _launch(env, *args, timeout=300):
    res = subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=ROOT, env=env[0], capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_ep2_and_tp2_generation_equal_one_process(cpu_env, trained, tmp_path):
    run = trained("ep2", 2, "parallel.ep=2")
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": f"q{i}", "prompt": p} for i, p in enumerate(["What is 3 + 4?", "What is 12 * 11?", "Hi", "What is 99 - 98?",
                                                                 "What is 7 * 8? Answer briefly."])]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))  # 5 prompts: one rank gets a stand-in batch
    outputs = {}
    for name, args in (("one", ["--cluster", "cpu1"]), ("ep2", ["--cluster", "cpu2", "--ep", "2"]),
                       ("tp2", ["--cluster", "cpu2", "--tp", "2"])):
        res = _launch(cpu_env, "generate", str(run), "--input", str(prompts), "--max-new-tokens", "12", "--batch-size", "2",
                      "--out", str(tmp_path / f"{name}.jsonl"), *args)
        assert ("TP2 EP1 DP1" if name == "tp2" else "TP1 EP2 DP2" if name == "ep2" else "TP1 EP1 DP1") in res.stdout
        outputs[name] = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert [o["id"] for o in outputs["one"]] == [r["id"] for r in rows]
    assert outputs["ep2"] == outputs["one"] and outputs["tp2"] == outputs["one"]
    assert all(o["new_tokens"] > 0 for o in outputs["one"])


def test_eval_writes_one_row_per_example_with_metadata(cpu_env, trained, tmp_path_factory):
    from trainer.smoke_data import write_smoke_dataset

    data = write_smoke_dataset(tmp_path_factory.mktemp("sft") / "data", n_train=200, n_val=20, n_test=30)
    test = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    with open(data / "test.jsonl", "w") as f:  # metadata fields ride along into results.csv
        for i, row in enumerate(test):
            f.write(json.dumps({**row, "id": f"t{i}", "ticker": "ACME" if i % 2 else "INIT", "meta": {"n": i}}) + "\n")
    run = trained("eval-src", 2, "parallel.ep=2", f"data.path={data}")
    res = _launch(cpu_env, "eval", str(run), "--cluster", "cpu2", "--ep", "2", "--max-new-tokens", "8")
    out = run / "eval" / "test-step-4"
    assert f"-> {out}/results.csv" in res.stdout and "exact match" in res.stdout
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(test) == 30
    assert list(rows[0])[:9] == ["id", "input", "reference", "prediction", "exact_match", "f1", "prompt_tokens", "answer_tokens", "finish"]
    assert [r["id"] for r in rows] == [f"t{i}" for i in range(30)] and rows[1]["ticker"] == "ACME" and json.loads(rows[3]["meta"]) == {"n": 3}
    assert [r["reference"] for r in rows] == [t["output"] for t in test]
    for r in rows:
        assert r["exact_match"] == str(int(r["prediction"].strip().lower() == r["reference"].lower()))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["examples"] == 30 and summary["step"] == 4 and summary["split"] == "test"
    assert summary["exact_match"] == pytest.approx(sum(int(r["exact_match"]) for r in rows) / 30)
    assert 0 < summary["loss"] < 10 and summary["perplexity"] == pytest.approx(2.718281828 ** summary["loss"], rel=1e-6)
    assert sum(summary["finish"].values()) == 30
    # the same run evaluated again gets a directory of its own
    _launch(cpu_env, "eval", str(run), "--cluster", "cpu1", "--max-new-tokens", "8", "--limit", "5")
    again = run / "eval" / "test-step-4-2"
    assert len(list(csv.DictReader(open(again / "results.csv")))) == 5
    # `launch eval HF_DIR --data DIR`: a model outside any run (a base model, a NeMo run's export). The run's fp32
    # export answers and scores as its checkpoint does (template from the export's moe_launch_export.json).
    hf, base = run / "hf-fp32", tmp_path_factory.mktemp("eval-hf")
    _launch(cpu_env, "export", str(run), "--cluster", "cpu1", "--dtype", "fp32", "--out", str(hf))
    common = ["--cluster", "cpu1", "--max-new-tokens", "8", "--limit", "5"]
    res = _launch(cpu_env, "eval", str(hf), *common, "--data", str(data), "--seq-length", "64", "--out", str(base / "from-hf"))
    assert "template chatml" in res.stdout
    with open(base / "from-hf" / "results.csv", newline="") as f:
        assert list(csv.DictReader(f)) == list(csv.DictReader(open(again / "results.csv", newline="")))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (again, base / "from-hf"))
    assert b["loss"] == pytest.approx(a["loss"], abs=2e-5) and b["label_tokens"] == a["label_tokens"]
    for missing, field in ((["--out", str(base / "x")], "--data"), (["--data", str(data)], "--out")):
        res = subprocess.run([sys.executable, "-m", "launcher.cli", "eval", str(hf), *common, *missing], cwd=ROOT,
                             env=cpu_env[0], capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and field in res.stderr and not (base / "x").exists(), res.stderr

