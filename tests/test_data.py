"""Job-side data: tokenizers, chat templates, SFT rows and packing, pretraining files, the resumable loader."""

import json
from types import SimpleNamespace

import pytest

from launcher.errors import UserError

torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")

from model.transformer import IGNORE_INDEX  # noqa: E402
from trainer.data import (  # noqa: E402
    SFTDataset, TokenFileDataset, build_train_loader, eval_batches, first_fit, load_sft_split,
    read_sft_jsonl, render_chat, tokens_in_batch, write_token_file,
)
from trainer.smoke_data import ensure_smoke_dataset, write_smoke_dataset  # noqa: E402
from trainer.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer  # noqa: E402


def data_cfg(**kw):
    base = dict(kind="sft", path=None, template="chatml", answer_only_loss=True, seq_length=64, packing=True, tokenizer="byte")
    return SimpleNamespace(**{**base, **kw})


def train_cfg(**kw):
    return SimpleNamespace(**{**dict(global_batch_size=8, micro_batch_size=2, seed=7), **kw})


def write_jsonl(directory, name, rows):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


@pytest.fixture
def sft_dir(tmp_path):
    rows = [{"input": f"q{i} " + "x" * (i % 7), "output": f"a{i}" + "y" * (i % 5)} for i in range(37)]
    return write_jsonl(tmp_path / "sft", "training.jsonl", rows)


# ----------------------------------------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trip_with_specials():
    tok = ByteTokenizer()
    assert tok.vocab_size == 261 <= 512
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (256, 257, 258)
    assert tok.token_to_id("<|im_start|>") == 259 and tok.token_to_id("<|im_end|>") == 260
    assert tok.token_to_id("no such token") is None
    text = "<|im_start|>user\nhé 🙂<|im_end|>\n"
    ids = tok.encode(text)
    assert ids[0] == 259 and 260 in ids and all(0 <= i < 261 for i in ids)
    assert tok.encode("hé") == list("hé".encode())
    assert tok.decode(ids) == text
    assert load_tokenizer("byte").encode("ab") == [97, 98]


def _tiny_hf_tokenizer(directory, config=None):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tk.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["What is 1 + 2? 3", "hello world, hello there"] * 20, trainer)
    from tokenizers.processors import TemplateProcessing

    tk.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    directory.mkdir(parents=True, exist_ok=True)
    tk.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_hf_tokenizer(tmp_path):
    d = _tiny_hf_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(str(d))
    assert isinstance(tok, HFTokenizer)
    assert tok.bos_id == tok.token_to_id("<s>") and tok.eos_id == tok.token_to_id("</s>") and tok.pad_id is None
    ids = tok.encode("hello world")
    assert tok.bos_id not in ids  # no automatic special tokens despite the post-processor
    assert tok.decode(ids) == "hello world"
    assert HFTokenizer(d / "tokenizer.json").encode("hello") == tok.encode("hello")
    # tokenizer_config.json wins, strings or {"content": ...} dicts
    d2 = _tiny_hf_tokenizer(tmp_path / "tok2", {"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>", "pad_token": "<unk>"})
    tok2 = load_tokenizer(str(d2))
    assert (tok2.bos_id, tok2.eos_id, tok2.pad_id) == (tok2.token_to_id("<|im_start|>"), tok2.token_to_id("<|im_end|>"), tok2.token_to_id("<unk>"))
    # chatml uses the special tokens as single ids
    p, a = render_chat("chatml", "What is 1 + 2?", "3", tok)
    assert p[0] == tok.bos_id and p[1] == tok.token_to_id("<|im_start|>") and a[-2] == tok.token_to_id("<|im_end|>")
    assert tok.decode(p + a) == "<s><|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n3<|im_end|>\n"
    with pytest.raises(UserError, match="no such file or directory"):
        load_tokenizer(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------------ templates

def test_chatml_and_plain_templates():
    tok = ByteTokenizer()
    p, a = render_chat("chatml", "hi", "yo", tok)
    assert tok.decode(p) == "<|bos|><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(a) == "yo<|im_end|>\n"
    assert p.count(259) == 2 and a.count(260) == 1
    p, a = render_chat("plain", "hi", "yo", tok)
    assert tok.decode(p) == "<|bos|>hi\n" and tok.decode(a) == "yo<|eos|>"
    with pytest.raises(ValueError, match="template"):
        render_chat("alpaca", "hi", "yo", tok)


def test_sft_jsonl_synonyms_and_malformed_lines(tmp_path):
    d = write_jsonl(tmp_path / "d", "training.jsonl", [{"input": "a", "output": "b"}, {"prompt": "c", "completion": "d"}])
    assert read_sft_jsonl(d / "training.jsonl") == [("a", "b"), ("c", "d")]
    assert len(load_sft_split(d, "train", ByteTokenizer())) == 2
    bad = tmp_path / "bad" / "training.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"input": "a", "output": "b"}\n\n{"input": "a", oops}\n')
    with pytest.raises(UserError, match=r"training\.jsonl: line 3: invalid JSON"):
        read_sft_jsonl(bad)
    bad.write_text('{"input": "a", "output": "b"}\n{"input": "a"}\n')
    with pytest.raises(UserError, match=r"line 2: needs string fields"):
        read_sft_jsonl(bad)
    with pytest.raises(UserError, match="no such file"):
        load_sft_split(tmp_path / "bad", "validation", ByteTokenizer())


# ------------------------------------------------------------------------------------------- rows, packing

def test_answer_only_labels_unpacked():
    tok = ByteTokenizer()
    p, a = render_chat("chatml", "2+2", "4", tok)
    full = p + a
    ds = SFTDataset([(p, a)], seq_length=64, pad_id=tok.pad_id, answer_only_loss=True, packing=False)
    row = ds[0]
    n = len(full) - 1
    assert row["input_ids"][:n].tolist() == full[:-1]
    labels = row["labels"].tolist()
    # position i predicts token i + 1; only answer tokens are targets
    assert labels[:len(p) - 1] == [IGNORE_INDEX] * (len(p) - 1)
    assert labels[len(p) - 1:n] == a
    assert labels[n:] == [IGNORE_INDEX] * (64 - n) and row["input_ids"][n:].eq(tok.pad_id).all()
    assert row["segment_ids"].tolist() == [0] * n + [1] * (64 - n)
    assert row["position_ids"].tolist() == list(range(n)) + list(range(64 - n))
    all_labels = SFTDataset([(p, a)], 64, tok.pad_id, answer_only_loss=False, packing=False)[0]["labels"].tolist()
    assert all_labels[:n] == full[1:]
    assert ds.stats()["label_tokens"] == len(a)


def test_packing_correctness(sft_dir):
    tok = ByteTokenizer()
    samples = load_sft_split(sft_dir, "training", tok)
    seq = 64
    ds = SFTDataset(samples, seq, tok.pad_id, answer_only_loss=True, packing=True)
    assert len(ds) < len(samples)
    seen = []
    for r in range(len(ds)):
        row = ds[r]
        assert all(v.shape == (seq,) for v in row.values())
        seg, pos, ids, lab = (row[k].tolist() for k in ("segment_ids", "position_ids", "input_ids", "labels"))
        assert seg == sorted(seg) and seg[0] == 0
        for s in sorted(set(seg)):
            idx = [i for i in range(seq) if seg[i] == s]
            assert idx == list(range(idx[0], idx[-1] + 1))
            assert [pos[i] for i in idx] == list(range(len(idx)))  # positions restart per segment
            if s == len(ds.rows[r]):  # padding segment
                assert all(lab[i] == IGNORE_INDEX and ids[i] == tok.pad_id for i in idx)
                continue
            k = ds.rows[r][s]
            p, a = samples[k]
            full = p + a
            seen.append(k)
            assert [ids[i] for i in idx] == full[:-1]
            # every label is the next token of the same sample (never the next sample's first token)
            assert [lab[i] for i in idx] == [t if j + 1 >= len(p) else IGNORE_INDEX for j, t in enumerate(full[1:])]
    assert sorted(seen) == list(range(len(samples)))
    assert first_fit([5, 7, 3, 2, 6], 10) == [[0, 2, 3], [1], [4]]


def test_truncation_counted():
    tok = ByteTokenizer()
    samples = [render_chat("plain", "x" * 50, "y" * 30, tok), render_chat("plain", "a", "b", tok)]
    ds = SFTDataset(samples, seq_length=32, pad_id=tok.pad_id, answer_only_loss=True, packing=True)
    p, a = samples[0]
    st = ds.stats()
    assert st["samples"] == 2 and st["truncated"] == 1 and st["dropped_tokens"] == len(p) + len(a) - 33
    assert ds[0]["input_ids"].tolist() == p[:32] and ds[0]["labels"].eq(IGNORE_INDEX).all()  # the answer was cut off
    assert st["rows"] == 2


# ------------------------------------------------------------------------------------------- loader

def _take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def _same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)


def test_loader_shapes_determinism_and_epochs(sft_dir):
    tok = ByteTokenizer()
    cfg = data_cfg(path=str(sft_dir), packing=False)
    loader = build_train_loader(cfg, train_cfg(), tok, 0, 1)
    assert loader.micro_batches_per_step == 4
    b = loader.next_batch()
    assert set(b) == {"input_ids", "labels", "position_ids", "segment_ids"}
    assert all(v.shape == (2, 64) and v.dtype == torch.long for v in b.values())
    assert tokens_in_batch(b) == int((b["labels"] != IGNORE_INDEX).sum()) > 0
    again = build_train_loader(cfg, train_cfg(), tok, 0, 1)
    assert _same([b] + _take(loader, 30), _take(again, 31))
    other = build_train_loader(cfg, train_cfg(seed=8), tok, 0, 1)
    assert not _same(_take(build_train_loader(cfg, train_cfg(), tok), 3), _take(other, 3))
    # every row exactly once per epoch, epochs roll over with a fresh order
    n = len(loader.dataset)
    stream = [loader.global_row(g) for g in range(2 * n)]
    assert sorted(stream[:n]) == sorted(stream[n:]) == list(range(n)) and stream[:n] != stream[n:]
    assert stream[:n] == torch.randperm(n, generator=torch.Generator().manual_seed(7)).tolist()
    st = loader.stats()
    assert st["samples"] == st["rows"] == 37 and st["truncated"] == 0 and st["label_tokens"] > 0


def test_exact_resume(sft_dir):
    tok = ByteTokenizer()
    cfg = data_cfg(path=str(sft_dir))
    full = build_train_loader(cfg, train_cfg(), tok, 1, 2)
    reference = _take(full, 40)  # 20 steps of 2 micro batches: several epochs
    first = build_train_loader(cfg, train_cfg(), tok, 1, 2)
    _take(first, 14)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build_train_loader(cfg, train_cfg(), tok, 1, 2)
    resumed.load_state_dict(state)
    assert _same(_take(resumed, 26), reference[14:])
    # mid-step state resumes too (same layout)
    mid = build_train_loader(cfg, train_cfg(), tok, 1, 2)
    _take(mid, 5)
    again = build_train_loader(cfg, train_cfg(), tok, 1, 2)
    again.load_state_dict(mid.state_dict())
    assert _same(_take(again, 3), reference[5:8])
    with pytest.raises(ValueError, match="middle of a step"):
        build_train_loader(cfg, train_cfg(), tok, 0, 4).load_state_dict(mid.state_dict())
    with pytest.raises(ValueError, match="seed"):
        build_train_loader(cfg, train_cfg(seed=1), tok, 1, 2).load_state_dict(state)


def test_resume_with_different_dp_size(sft_dir):
    tok = ByteTokenizer()
    cfg = data_cfg(path=str(sft_dir), packing=False)

    def global_batches(loaders, steps):
        """Per step, the rows of the whole global batch, rank by rank."""
        out = []
        for _ in range(steps):
            rows = []
            for ld in loaders:
                for _ in range(ld.micro_batches_per_step):
                    rows += [tuple(r) for r in ld.next_batch()["input_ids"].tolist()]
            out.append(rows)
        return out

    reference = global_batches([build_train_loader(cfg, train_cfg(), tok, 0, 1)], 9)
    two = [build_train_loader(cfg, train_cfg(), tok, r, 2) for r in range(2)]
    assert global_batches(two, 4) == reference[:4]
    state = two[0].state_dict()
    four = [build_train_loader(cfg, train_cfg(), tok, r, 4) for r in range(4)]
    for ld in four:
        ld.load_state_dict(state)
    assert four[0].micro_batches_per_step == 1
    assert global_batches(four, 5) == reference[4:]
    with pytest.raises(ValueError, match="multiple"):
        build_train_loader(cfg, train_cfg(global_batch_size=6), tok, 0, 4)


def test_eval_batches_cover_every_row_once(sft_dir):
    tok = ByteTokenizer()
    ds = SFTDataset(load_sft_split(sft_dir, "training", tok), 64, tok.pad_id, packing=False)
    per_rank = [list(eval_batches(ds, 4, r, 3)) for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1
    labelled = [tuple(row) for batches in per_rank for b in batches
                for row, lab in zip(b["input_ids"].tolist(), b["labels"].tolist()) if any(x != IGNORE_INDEX for x in lab)]
    assert sorted(labelled) == sorted(tuple(ds[i]["input_ids"].tolist()) for i in range(len(ds)))


# ------------------------------------------------------------------------------------------- pretraining

def test_token_file_dataset(tmp_path):
    tokens = list(range(1000, 1000 + 100))
    write_token_file(tmp_path / "a.bin", tokens)  # uint16
    ds = TokenFileDataset(tmp_path / "a.bin", seq_length=9)
    assert len(ds) == 10 and ds.stats()["dropped_tokens"] == 0
    row = ds[3]
    assert row["input_ids"].tolist() == tokens[30:39] and row["labels"].tolist() == tokens[31:40]
    assert row["position_ids"].tolist() == list(range(9)) and row["segment_ids"].eq(0).all()
    big = [70000 + i for i in range(25)]
    write_token_file(tmp_path / "b.bin", big, "uint32")
    ds = TokenFileDataset(tmp_path / "b.bin", seq_length=7)
    assert len(ds) == 3 and ds.stats()["dropped_tokens"] == 1 and ds[2]["labels"].tolist() == big[17:24]
    loader = build_train_loader(data_cfg(kind="pretrain", path=str(tmp_path / "b.bin"), seq_length=7),
                                train_cfg(global_batch_size=2, micro_batch_size=1), None)
    b = loader.next_batch()
    assert b["input_ids"].shape == (1, 7) and tokens_in_batch(b) == 7
    with pytest.raises(ValueError, match="out of range"):
        write_token_file(tmp_path / "c.bin", [70000], "uint16")


# ------------------------------------------------------------------------------------------- smoke data

def test_smoke_dataset(tmp_path):
    a = write_smoke_dataset(tmp_path / "a", n_train=300, n_val=30, n_test=30, seed=3)
    b = write_smoke_dataset(tmp_path / "b", n_train=300, n_val=30, n_test=30, seed=3)
    for name in ("training.jsonl", "validation.jsonl", "test.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    pairs = {s: read_sft_jsonl(a / f"{s}.jsonl") for s in ("training", "validation", "test")}
    assert [len(v) for v in pairs.values()] == [300, 30, 30]
    questions = [q for v in pairs.values() for q, _ in v]
    assert len(set(questions)) == len(questions)  # the splits share no question
    for q, ans in pairs["training"]:
        x, op, y = q.removeprefix("What is ").removesuffix("?").split()
        assert int(ans) == {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[op]
    tok = ByteTokenizer()
    assert max(len(p) + len(a_) for p, a_ in load_sft_split(a, "training", tok)) <= 48
    c = write_smoke_dataset(tmp_path / "c", n_train=300, n_val=30, n_test=30, seed=4)
    assert (c / "training.jsonl").read_bytes() != (a / "training.jsonl").read_bytes()
    # the cached default dataset, written once; the smoke recipe's settings load it
    cache = tmp_path / "cache"
    d = ensure_smoke_dataset(cache)
    mtime = (d / "training.jsonl").stat().st_mtime_ns
    assert ensure_smoke_dataset(cache) == d and (d / "training.jsonl").stat().st_mtime_ns == mtime
    assert [p.name for p in cache.iterdir()] == [d.name]
    loader = build_train_loader(data_cfg(seq_length=128), train_cfg(global_batch_size=16, micro_batch_size=4), tok, 0, 2, cache_dir=cache)
    st = loader.stats()
    assert st["samples"] == 2000 and st["truncated"] == 0 and st["rows"] < 1000
    assert loader.next_batch()["input_ids"].shape == (4, 128)
