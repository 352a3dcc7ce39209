"""``launch data tokens``: text/JSONL -> the pretraining token file, checked against a one-process reference."""

import gzip
import json
import os
import random
import subprocess
import sys

import pytest

from launcher.cli import main as launch

np = pytest.importorskip("numpy")
pytest.importorskip("tokenizers")

from dataprep import tokens as tokens_mod  # noqa: E402
from dataprep.token_file import dtype_for_vocab, open_tokens, read_document_offsets  # noqa: E402
from trainer.tokenizer import load_tokenizer  # noqa: E402

from conftest import ROOT  # noqa: E402

WORDS = "the a cat dog sat ran on under mat log red blue big small quickly slowly and then".split()


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + "."


def write_corpus(d, n_docs=40, seed=0):
    """JSONL (plain and .gz, in a directory too) and .txt sources; returns the files in reading order."""
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    docs = [" ".join(sentence(rng) for _ in range(rng.randint(1, 6))) for _ in range(n_docs)]
    docs[3] = "Unicode: héllo wörld 🙂, and a special token string <|eos|> inside."
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(docs)]
    lines.insert(5, "")  # a blank line
    lines.insert(7, json.dumps({"text": "", "id": -1}))  # an empty document: skipped
    (d / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (d / "sub").mkdir(exist_ok=True)
    with gzip.open(d / "sub" / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"body": sentence(rng), "text": sentence(rng) + "\n" + sentence(rng)}) + "\n" for _ in range(15))
    (d / "sub" / "c.txt").write_text("A whole file is one document.\n\nWith two paragraphs.\n", encoding="utf-8")
    return [d / "a.jsonl", d / "sub" / "b.jsonl.gz", d / "sub" / "c.txt"]


def reference(files, tok, eos_id, sample_by="document", text_key="text"):
    """The straightforward one-process tokenization: (ids, document offsets)."""
    ids, offsets = [], [0]
    for f in files:
        raw = (gzip.open(f, "rb") if f.name.endswith(".gz") else open(f, "rb")).read().decode("utf-8")
        if ".jsonl" in f.name:
            docs = [json.loads(line)[text_key] for line in raw.splitlines() if line.strip()]
        elif sample_by == "line":
            docs = raw.splitlines()
        elif sample_by == "paragraph":
            docs = [p.strip("\n") for p in raw.split("\n\n")]
        else:
            docs = [raw]
        for doc in docs:
            if doc.strip():
                ids += tok.encode(doc) + [eos_id]
                offsets.append(len(ids))
    return ids, offsets


def tiny_hf_tokenizer(d, specials=("<|endoftext|>",)):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    rng = random.Random(1)
    tk.train_from_iterator([sentence(rng) for _ in range(300)], trainer)
    d.mkdir(parents=True)
    tk.save(str(d / "tokenizer.json"))
    return d


def run(capsys, *args):
    code = launch(["data", "tokens", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("tokenizer", ["byte", "hf"])
@pytest.mark.parametrize("workers", [1, 2])
def test_same_ids_and_boundaries_as_a_one_process_reference(tmp_path, capsys, monkeypatch, tokenizer, workers):
    monkeypatch.setattr(tokens_mod, "CHUNK_BYTES", 200)  # many chunks, spread over the workers
    files = write_corpus(tmp_path / "corpus")
    spec = "byte" if tokenizer == "byte" else str(tiny_hf_tokenizer(tmp_path / "tok"))
    tok = load_tokenizer(spec)
    out = tmp_path / "out" / "train.bin"
    code, stdout, err = run(capsys, tmp_path / "corpus" / "a.jsonl", tmp_path / "corpus" / "sub", "--out", out,
                            "--tokenizer", spec, "--workers", workers)
    assert code == 0, err
    ids, offsets = reference(files, tok, tok.eos_id)
    tokens, meta = open_tokens(out)
    assert tokens.tolist() == ids
    assert read_document_offsets(out).tolist() == offsets
    assert meta["dtype"] == "uint16" and tokens.dtype == np.uint16
    assert (meta["tokens"], meta["documents"], meta["eos_id"]) == (len(ids), len(offsets) - 1, tok.eos_id)
    assert meta["sources"] == [str(f) for f in files]
    assert sorted(p.name for p in out.parent.iterdir()) == ["train.bin", "train.bin.idx", "train.bin.json"]  # no staging left
    assert f"{len(offsets) - 1:,} documents (1 empty skipped), {len(ids):,} tokens" in stdout
    assert "tokens/s" in stdout and "uint16" in stdout


def test_txt_documents_paragraphs_lines(tmp_path, capsys):
    d = tmp_path / "c"
    d.mkdir()
    (d / "x.txt").write_text("First line.\nSecond line.\n\n\nA paragraph\nover two lines.\r\n\n   \nLast", encoding="utf-8")
    tok = load_tokenizer("byte")
    for mode in ("document", "paragraph", "line"):
        out = tmp_path / f"{mode}.bin"
        code, _, err = run(capsys, d / "x.txt", "--out", out, "--tokenizer", "byte", "--sample-by", mode, "--workers", 1)
        assert code == 0, err
        docs = [tok.decode(open_tokens(out)[0][a:b - 1]) for a, b in zip(read_document_offsets(out)[:-1], read_document_offsets(out)[1:])]
        assert docs == {"document": ["First line.\nSecond line.\n\n\nA paragraph\nover two lines.\r\n\n   \nLast"],
                        "paragraph": ["First line.\nSecond line.", "A paragraph\nover two lines.", "Last"],
                        "line": ["First line.", "Second line.", "A paragraph", "over two lines.", "Last"]}[mode]


def test_dtype_rule():
    assert dtype_for_vocab(261) == dtype_for_vocab(65536) == "uint16"
    assert dtype_for_vocab(65537) == dtype_for_vocab(129280) == "uint32"


def test_the_trainer_reads_it(tmp_path, capsys):
    pytest.importorskip("torch")
    from trainer.data import TokenFileDataset

    write_corpus(tmp_path / "corpus")
    out = tmp_path / "t.bin"
    assert run(capsys, tmp_path / "corpus", "--out", out, "--tokenizer", "byte", "--workers", 1)[0] == 0
    tokens = open_tokens(out)[0]
    ds = TokenFileDataset(out, seq_length=31)
    assert len(ds) == len(tokens) // 32 and ds.dtype == np.uint16
    assert ds[2]["input_ids"].tolist() == tokens[64:95].tolist() and ds[2]["labels"].tolist() == tokens[65:96].tolist()
    # a file cut short no longer matches its sidecar
    out.write_bytes(out.read_bytes()[:-2])
    with pytest.raises(ValueError, match="sidecar says"):
        TokenFileDataset(out, seq_length=31)


# ------------------------------------------------------------------------------------------------ bad input

def _bad_cases(d):
    """(arguments, expected words of the one error line); sources under d."""
    (d / "ok.jsonl").write_text('{"text": "fine"}\n' * 30)
    (d / "malformed.jsonl").write_text('{"text": "fine"}\n' * 20 + '{"text": "fine"}\n{"text": oops}\n')
    (d / "nokey.jsonl").write_text('{"text": "fine"}\n{"content": "no text key"}\n')
    (d / "notstr.jsonl").write_text('{"text": 3}\n')
    (d / "array.jsonl").write_text('["text"]\n')
    (d / "empty.jsonl").write_text("\n\n")
    (d / "blank.txt").write_text("   \n\n")
    (d / "latin1.txt").write_bytes("one\ntwo caf\xe9\n".encode("latin-1"))
    (d / "data.csv").write_text("text\nhello\n")
    whole = gzip.compress(b'{"text": "hello there"}\n' * 100)
    (d / "cut.jsonl.gz").write_bytes(whole[:len(whole) // 2])
    (d / "exists.bin").write_bytes(b"mine")
    (d / "side.bin.json").write_text("{}")
    (d / "emptydir").mkdir()
    return [
        (["missing.jsonl"], "missing.jsonl: no such file or directory"),
        (["malformed.jsonl", "--workers", "2"], "malformed.jsonl: line 22: invalid JSON: Expecting value (column 10)"),
        (["malformed.jsonl"], "malformed.jsonl: line 22: invalid JSON"),
        (["ok.jsonl", "nokey.jsonl"], "nokey.jsonl: line 2: no field 'text' (found 'content'); name the text field with --text-key"),
        (["ok.jsonl", "--text-key", "body"], "ok.jsonl: line 1: no field 'body' (found 'text')"),
        (["notstr.jsonl"], "notstr.jsonl: line 1: field 'text' must be a string, got int"),
        (["array.jsonl"], "array.jsonl: line 1: expected a JSON object, got list"),
        (["empty.jsonl", "blank.txt"], "empty.jsonl, "),
        (["latin1.txt", "--sample-by", "line"], "latin1.txt: line 2: not UTF-8 text (byte 0xe9)"),
        (["data.csv"], "data.csv: unknown input format (valid: .jsonl, .ndjson or .txt"),
        (["cut.jsonl.gz"], "cut.jsonl.gz: cannot read: Compressed file ended before the end-of-stream marker was reached"),
        (["emptydir"], "emptydir: no input files in this directory"),
        (["ok.jsonl", "--tokenizer", "gpt2"], "gpt2: no such file or directory"),
        (["ok.jsonl", "--workers", "0"], "--workers: must be >= 1, got 0"),
        (["ok.jsonl", "--eos-token", "<|nope|>"], "--eos-token: '<|nope|>' is not a token of byte"),
        (["ok.jsonl", "--sample-by", "page"], "launch data tokens: argument --sample-by: invalid choice: 'page'"),
    ]


def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tokens_mod, "CHUNK_BYTES", 64)  # the malformed line is in a later chunk, after output began
    d = tmp_path / "in"
    d.mkdir()
    cases = _bad_cases(d)
    monkeypatch.chdir(d)
    before = sorted(p.name for p in d.iterdir())
    for args, words in cases:
        if "--tokenizer" not in args:
            args = [*args, "--tokenizer", "byte"]
        if "--workers" not in args:
            args = [*args, "--workers", "1"]
        code, out, err = run(capsys, *args, "--out", d / "new" / "deeper" / "t.bin")
        assert code == 2, (args, err)
        assert err.count("\n") == 1 and err.startswith("launch: error: ") and words in err, (args, err)
        assert sorted(p.name for p in d.iterdir()) == before, args  # nothing written, no directory made
    # an existing FILE, FILE.json or FILE.idx is refused and left as it is
    for out, which in (("exists.bin", "exists.bin"), ("side.bin", "side.bin.json")):
        code, _, err = run(capsys, "ok.jsonl", "--tokenizer", "byte", "--out", out)
        assert code == 2 and f"{which}: exists; launch data tokens never overwrites" in err
    assert (d / "exists.bin").read_bytes() == b"mine" and (d / "side.bin.json").read_text() == "{}"
    assert sorted(p.name for p in d.iterdir()) == before


def test_tokenizer_without_eos(tmp_path, capsys):
    tok = tiny_hf_tokenizer(tmp_path / "tok", specials=())  # no <|endoftext|>: nothing to end a document with
    (tmp_path / "a.jsonl").write_text('{"text": "the cat"}\n')
    code, _, err = run(capsys, tmp_path / "a.jsonl", "--out", tmp_path / "t.bin", "--tokenizer", tok)
    assert code == 2 and "has no end-of-sequence token" in err and "--eos-token" in err
    code, _, err = run(capsys, tmp_path / "a.jsonl", "--out", tmp_path / "t.bin", "--tokenizer", tok, "--eos-token", ".")
    assert code == 0, err
    assert open_tokens(tmp_path / "t.bin")[1]["eos_id"] == load_tokenizer(str(tok)).token_to_id(".")


# ------------------------------------------------------------------------------------------------ end to end

def test_pretrain_recipe_trains_on_the_token_file(tmp_path, cpu_env):
    """`launch data tokens` output trains recipes/pretrain.py, shrunk by overrides, on 2 CPU processes (EP2)."""
    pytest.importorskip("torch")
    rng = random.Random(5)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "docs.jsonl").write_text("".join(json.dumps({"text": " ".join(sentence(rng) for _ in range(4))}) + "\n"
                                               for _ in range(400)))
    out = tmp_path / "tokens" / "train.bin"
    env = cpu_env[0]
    res = subprocess.run([sys.executable, "-m", "launcher.cli", "data", "tokens", str(corpus), "--out", str(out),
                          "--tokenizer", "byte", "--workers", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    runs = tmp_path / "runs"
    overrides = ["model=tiny", "parallel.ep=2", "data.seq_length=64", f"data.path={out}", "data.tokenizer=byte",
                 "backend.name=native", "train.precision=fp32", "train.max_steps=16", "train.global_batch_size=8",
                 "train.micro_batch_size=2", "train.warmup_steps=2", "train.lr=3e-3", "train.min_lr=3e-4",
                 "train.log_interval=1", "checkpoint.interval=1000"]
    res = subprocess.run([sys.executable, "-m", "launcher.cli", "recipes/pretrain.py", "--cluster", "cpu2", "--runs-dir", str(runs),
                          *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (run,) = [p for p in runs.iterdir() if not p.name.startswith(".")]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 16
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses
    assert os.path.getsize(out) == 2 * json.loads((out.parent / "train.bin.json").read_text())["tokens"]
