"""`launch data sft`: every input format to the same output, templates exactly as the trainer tokenizes
them, a reproducible split, the trainer's truncation counts, and bad input refused in one line."""

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import cli
from launcher.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SPLIT_NAMES = ("training.jsonl", "validation.jsonl", "test.jsonl")

# A DeepSeek-V3-like template (bos, system first, <｜User｜>/<｜Assistant｜>, eos after answers) and a Qwen-like
# ChatML one (no bos, a default system message): the two shapes of template the Hub has most.
DEEPSEEK_LIKE = (
    "{% set ns = namespace(system='') %}{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = m['content'] %}"
    "{% endif %}{% endfor %}{{ bos_token }}{{ ns.system }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '<｜User｜>' + m['content'] }}{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' }}{% generation %}"
    "{{ m['content'] + eos_token }}{% endgeneration %}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<｜Assistant｜>' }}{% endif %}")
QWEN_LIKE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def records(n=40):
    cats = ("addition", "subtraction")
    return [{"id": f"r{i:03d}", "question": f"What is {i} {'+-'[i % 2]} {i % 7}?", "answer": str(i + i % 7 if i % 2 == 0 else i - i % 7),
             "category": cats[i % 2]} for i in range(n)]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def sft(*args, capsys=None):
    """`launch data sft ARGS` in this process: (exit code, stdout, stderr)."""
    code = cli.main(["data", "sft", *map(str, args)])
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


def read_split(directory, name="training.jsonl"):
    return [json.loads(line) for line in (Path(directory) / name).read_text(encoding="utf-8").splitlines()]


def hf_tokenizer_dir(path, chat_template=None, bos="<|bos|>", eos="<|eos|>", jinja_file=False):
    """The project's byte-level tokenizer.json plus DeepSeek's and Qwen's chat tokens, with a tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer

    from trainer.tokenizer import byte_tokenizer_json

    tk = Tokenizer.from_str(byte_tokenizer_json())
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in
                           ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>")])
    path.mkdir(parents=True)
    tk.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos}
    if chat_template is not None and jinja_file:
        (path / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    elif chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return path


def labelled(dataset, i):
    """The label tokens (answer-only loss) of row ``i`` of an unpacked trainer dataset."""
    from model.transformer import IGNORE_INDEX

    return [int(t) for t in dataset[i]["labels"] if t != IGNORE_INDEX]


def trainer_dataset(directory, split, tokenizer, template, seq_length=4096, packing=False):
    from trainer.data import SFTDataset, load_sft_split

    samples = load_sft_split(directory, split, tokenizer, template)
    pad = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)
    return samples, SFTDataset(samples, seq_length, pad, answer_only_loss=True, packing=packing)


# ------------------------------------------------------------------------------------------- formats

def test_every_input_format_gives_the_same_output(tmp_path, capsys):
    rows = records(40)
    src = tmp_path / "src"
    files = {"jsonl": write_jsonl(src / "raw.jsonl", rows)}
    files["json"] = src / "raw.json"
    files["json"].write_text(json.dumps(rows))
    files["json-data"] = src / "wrapped.json"
    files["json-data"].write_text(json.dumps({"version": 2, "data": rows}))
    files["json-lines"] = write_jsonl(src / "lines.json", rows)  # .json holding JSON Lines, as many datasets ship it
    files["csv"] = src / "raw.csv"
    with open(files["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    files["jsonl.gz"] = src / "raw.jsonl.gz"
    files["jsonl.gz"].write_bytes(gzip.compress(files["jsonl"].read_bytes()))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    files["parquet"] = src / "raw.parquet"
    pq.write_table(pa.Table.from_pylist(rows), files["parquet"], row_group_size=7)
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(src / "ds"), num_shards=3)
    files["datasets"] = src / "ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:25]),
                          "test": datasets.Dataset.from_list(rows[25:])}).save_to_disk(str(src / "dsdict"))
    files["datasetdict"] = src / "dsdict"

    outputs = {}
    for name, path in files.items():
        out = tmp_path / "out" / name
        code, stdout, err = sft(path, "--out", out, "--input-key", "question", "--output-key", "answer", capsys=capsys)
        assert code == 0, err
        outputs[name] = {f: (out / f).read_bytes() for f in SPLIT_NAMES}
        assert json.loads((out / "stats.json").read_text())["records"]["read"] == 40
    reference = outputs.pop("jsonl")
    for name, got in outputs.items():
        assert got == reference, name
    train = read_split(tmp_path / "out" / "jsonl")
    assert len(train) == 36 and sum(len(read_split(tmp_path / "out" / "jsonl", f)) for f in SPLIT_NAMES) == 40
    by_id = {r["id"]: r for r in rows}
    for rec in train:  # input/output first, then every other field of the record, as it was
        assert list(rec) == ["input", "output", "id", "category"]
        assert (rec["input"], rec["output"], rec["category"]) == (by_id[rec["id"]]["question"], by_id[rec["id"]]["answer"], by_id[rec["id"]]["category"])


def test_field_names_are_found_and_chat_records_read(tmp_path, capsys):
    src = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}", "n": i} for i in range(20)])
    assert sft(src, "--out", tmp_path / "a", "--split", "0.8,0.2", capsys=capsys)[0] == 0
    assert len(read_split(tmp_path / "a", "validation.jsonl")) == 4 and not (tmp_path / "a" / "test.jsonl").exists()
    assert sft(src, "--out", tmp_path / "a1", "--split", "1,0", capsys=capsys)[0] == 0
    assert read_split(tmp_path / "a1")[0] == {"input": "p0", "output": "c0", "n": 0}
    assert sorted(p.name for p in (tmp_path / "a1").iterdir()) == ["stats.json", "training.jsonl"]
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": f"Add {i} and 1.", "input": "" if i % 2 else f"{i} + 1",
                                                       "output": str(i + 1)} for i in range(20)])
    assert sft(alpaca, "--out", tmp_path / "b", "--split", "1,0", capsys=capsys)[0] == 0
    rows = {r["output"]: r for r in read_split(tmp_path / "b")}
    assert rows["3"] == {"input": "Add 2 and 1.\n\n2 + 1", "output": "3"} and rows["2"] == {"input": "Add 1 and 1.", "output": "2"}
    share = write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": f"hi {i}"},
                           {"from": "gpt", "value": f"yo {i}"}], "source": "x"} for i in range(20)])
    assert sft(share, "--out", tmp_path / "c", "--split", "1,0", capsys=capsys)[0] == 0
    assert read_split(tmp_path / "c")[0] == {"input": "Be brief.\n\nhi 0", "output": "yo 0", "source": "x"}


# ------------------------------------------------------------------------------------------ templates

@pytest.mark.parametrize("template", ["chatml", "plain"])
@pytest.mark.parametrize("tokenizer", ["byte", "hf"])
def test_chatml_and_plain_answer_only_labels_cover_exactly_the_answer(tmp_path, capsys, template, tokenizer):
    pytest.importorskip("torch")
    from trainer.chat import render_chat
    from trainer.tokenizer import load_tokenizer

    spec = "byte" if tokenizer == "byte" else str(hf_tokenizer_dir(tmp_path / "tok"))
    tok = load_tokenizer(spec)
    src = write_jsonl(tmp_path / "raw.jsonl", [{"q": f"What is {i} + {i}? é", "a": f"{2 * i} 🙂"} for i in range(20)])
    assert sft(src, "--out", tmp_path / "out", "--input-key", "q", "--output-key", "a", "--template", template,
               "--tokenizer", spec, "--split", "1,0", capsys=capsys)[0] == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["template"] == template
    samples, ds = trainer_dataset(tmp_path / "out", "training", tok, template)
    end = "<|im_end|>\n" if template == "chatml" else "<|eos|>"
    for i, rec in enumerate(read_split(tmp_path / "out")):
        p, a = render_chat(template, rec["input"], rec["output"], tok)
        assert samples[i] == (p, a) and labelled(ds, i) == a
        assert tok.decode(labelled(ds, i)) == rec["output"] + end
        assert ds[i]["input_ids"][:len(p)].tolist() == p


@pytest.mark.parametrize("template", ["chatml", "plain"])
def test_multi_turn_conversations_train_as_the_templates_jinja_twin_renders_them(tmp_path, capsys, template):
    pytest.importorskip("torch")
    from dataprep.chat_template import _compile
    from trainer.chat import JINJA
    from trainer.tokenizer import ByteTokenizer

    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "6"}]
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv, "id": i} for i in range(5)])
    assert sft(src, "--out", tmp_path / "out", "--template", template, "--split", "1,0", "--keep-duplicates", capsys=capsys)[0] == 0
    tok = ByteTokenizer()
    samples, ds = trainer_dataset(tmp_path / "out", "training", tok, template)
    merged = [{"role": "user", "content": "Be brief.\n\nWhat is 2 + 2?"}] + conv[2:]
    twin = _compile(JINJA[template], "twin")
    whole = twin.render(messages=merged, bos_token="<|bos|>", eos_token="<|eos|>", add_generation_prompt=False)
    prompt = twin.render(messages=merged[:-1], bos_token="<|bos|>", eos_token="<|eos|>", add_generation_prompt=template == "chatml")
    p, a = samples[0]
    assert tok.decode(p + a) == whole and tok.decode(p) == prompt
    assert tok.decode(labelled(ds, 0)) == whole[len(prompt):]  # only the last answer is trained on


@pytest.mark.parametrize("shape", ["deepseek", "qwen", "deepseek-jinja-file"])
def test_jinja_template_renders_like_transformers_and_trains_raw(tmp_path, capsys, shape):
    pytest.importorskip("torch")
    from trainer.tokenizer import load_tokenizer

    if shape.startswith("deepseek"):
        d = hf_tokenizer_dir(tmp_path / "tok", DEEPSEEK_LIKE, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", jinja_file=shape.endswith("file"))
    else:
        d = hf_tokenizer_dir(tmp_path / "tok", QWEN_LIKE, None, "<|im_end|>")
    convs = [[{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": str(i + 1)}] for i in range(8)]
    convs.append([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                  {"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}])
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in convs])
    code, out, _ = sft(src, "--out", tmp_path / "out", "--template", "jinja", "--tokenizer", d, "--split", "1,0", capsys=capsys)
    assert code == 0 and "data.template=raw" in out
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["template"] == "raw"
    rows = read_split(tmp_path / "out")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    for rec, conv in zip(rows, convs):
        assert rec["input"] == hf.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=False)
        assert rec["input"] + rec["output"] == hf.apply_chat_template(conv, tokenize=False)
    tok = load_tokenizer(str(d))
    samples, ds = trainer_dataset(tmp_path / "out", "training", tok, "raw")
    for i, rec in enumerate(rows):
        p, a = samples[i]
        assert p == tok.encode(rec["input"]) and labelled(ds, i) == a == tok.encode(rec["output"])
        if tok.bos_id is not None:  # the template's bos, once, from the rendered text: raw adds none
            assert p[0] == tok.bos_id and p.count(tok.bos_id) == 1
        assert tok.eos_id in a[-2:]  # the template's end of answer is trained on
    assert "<｜Assistant｜>" in rows[0]["input"] or rows[0]["input"].endswith("<|im_start|>assistant\n")


def test_jinja_with_the_chatml_twin_trains_exactly_like_chatml(tmp_path, capsys):
    from trainer.chat import JINJA, render_chat
    from trainer.tokenizer import load_tokenizer, write_hf_tokenizer

    d = tmp_path / "tok"
    d.mkdir()
    write_hf_tokenizer("byte", d, JINJA["chatml"], 1024)  # what an export of a chatml run (or model.fp8_synthetic) carries
    src = write_jsonl(tmp_path / "raw.jsonl", records(30))
    for template in ("jinja", "chatml"):
        assert sft(src, "--out", tmp_path / template, "--template", template, "--tokenizer", d, "--input-key", "question",
                   "--output-key", "answer", capsys=capsys)[0] == 0
    tok = load_tokenizer(str(d))
    for name in SPLIT_NAMES:
        for raw, chatml in zip(read_split(tmp_path / "jinja", name), read_split(tmp_path / "chatml", name), strict=True):
            assert render_chat("raw", raw["input"], raw["output"], tok) == render_chat("chatml", chatml["input"], chatml["output"], tok)
    stats = [json.loads((tmp_path / t / "stats.json").read_text()) for t in ("jinja", "chatml")]
    assert stats[0]["splits"] == stats[1]["splits"] and (stats[0]["template"], stats[1]["template"]) == ("raw", "chatml")


def test_raw_export_keeps_the_tokenizers_own_chat_template(tmp_path):
    torch = pytest.importorskip("torch")
    from export.hf import write_model_files
    from launcher.recipe import Data, Recipe
    from model.presets import tiny
    from trainer.chat import JINJA

    for name, as_file in (("config", False), ("file", True)):
        d = hf_tokenizer_dir(tmp_path / f"tok-{name}", DEEPSEEK_LIKE, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", jinja_file=as_file)
        for template in ("raw", "chatml"):
            out = tmp_path / f"out-{name}-{template}"
            out.mkdir()
            write_model_files(Recipe(model=tiny(), data=Data(template=template, tokenizer=str(d))), out, torch.float32, {})
            config = json.loads((out / "tokenizer_config.json").read_text())
            if template == "chatml":
                assert config["chat_template"] == JINJA["chatml"] and not (out / "chat_template.jinja").exists()
            elif as_file:
                assert (out / "chat_template.jinja").read_text() == DEEPSEEK_LIKE
            else:
                assert config["chat_template"] == DEEPSEEK_LIKE
            assert json.loads((out / "moe_launch_export.json").read_text())["template"] == template


def test_raw_generation_prompt_adds_bos_only_when_the_text_lacks_it():
    from launcher.tasks import prompt_ids
    from trainer.chat import render_chat
    from trainer.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    assert prompt_ids("raw", "hi", tok, render_chat) == [tok.bos_id, 104, 105]
    assert prompt_ids("raw", "<|bos|>hi", tok, render_chat) == [tok.bos_id, 104, 105] == render_chat("raw", "<|bos|>hi", "", tok)[0]


# ---------------------------------------------------------------------------------------------- split

def test_same_seed_same_split_in_any_process_and_other_seeds_differ(tmp_path, capsys):
    src = write_jsonl(tmp_path / "raw.jsonl", records(100))
    args = ["--input-key", "question", "--output-key", "answer", "--split", "0.8,0.1,0.1"]
    assert sft(src, "--out", tmp_path / "a", *args, "--seed", "7", capsys=capsys)[0] == 0
    assert sft(src, "--out", tmp_path / "b", *args, "--seed", "8", capsys=capsys)[0] == 0
    a = {f: (tmp_path / "a" / f).read_bytes() for f in SPLIT_NAMES}
    assert [len(read_split(tmp_path / "a", f)) for f in SPLIT_NAMES] == [80, 10, 10]
    ids = [r["id"] for f in SPLIT_NAMES for r in read_split(tmp_path / "a", f)]
    assert sorted(ids) == sorted(r["id"] for r in records(100))  # disjoint, and nothing lost
    assert (tmp_path / "b" / "test.jsonl").read_bytes() != a["test.jsonl"]
    # another process with another hash seed: the same files, and no torch imported on the way
    code = ("import sys; from launcher.cli import main; rc = main(sys.argv[1:]); "
            "print(rc, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'transformers', 'pyarrow')))")
    for i, hash_seed in enumerate(("1", "12345")):
        out = tmp_path / f"p{i}"
        res = subprocess.run([sys.executable, "-c", code, "data", "sft", str(src), "--out", str(out), *args, "--seed", "7"],
                             cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": hash_seed}, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and res.stdout.strip().splitlines()[-1] == "0 []", res.stderr
        assert {f: (out / f).read_bytes() for f in SPLIT_NAMES} == a


def test_split_column_and_split_by_source(tmp_path, capsys):
    rows = [{**r, "part": ("train", "dev", "TEST")[i % 3]} for i, r in enumerate(records(30))]
    src = write_jsonl(tmp_path / "raw.jsonl", rows)
    assert sft(src, "--out", tmp_path / "col", "--input-key", "question", "--output-key", "answer", "--split-column", "part", capsys=capsys)[0] == 0
    assert [r["part"] for r in read_split(tmp_path / "col", "validation.jsonl")] == ["dev"] * 10
    assert [r["id"] for r in read_split(tmp_path / "col", "test.jsonl")] == [r["id"] for r in rows[2::3]]
    for name, part in (("train.jsonl", rows[:20]), ("validation-00000-of-00001.jsonl", rows[20:25]), ("my_test_set.jsonl", rows[25:])):
        write_jsonl(tmp_path / "files" / name, part)
    files = [tmp_path / "files" / n for n in ("train.jsonl", "validation-00000-of-00001.jsonl", "my_test_set.jsonl")]
    code, out, _ = sft(*files, "--out", tmp_path / "src", "--input-key", "question", "--output-key", "answer", "--split", "source", capsys=capsys)
    assert code == 0 and "by source: training 20, validation 5, test 5" in out
    assert read_split(tmp_path / "src", "test.jsonl") == [{"input": r["question"], "output": r["answer"], **{k: r[k] for k in ("id", "category", "part")}} for r in rows[25:]]
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:20]), "validation": datasets.Dataset.from_list(rows[20:25]),
                          "test": datasets.Dataset.from_list(rows[25:])}).save_to_disk(str(tmp_path / "dsdict"))
    code, out, _ = sft(tmp_path / "dsdict", "--out", tmp_path / "dd", "--input-key", "question", "--output-key", "answer", "--split", "source", capsys=capsys)
    assert code == 0 and "by source: training 20, validation 5, test 5" in out
    assert {f: (tmp_path / "dd" / f).read_bytes() for f in SPLIT_NAMES} == {f: (tmp_path / "src" / f).read_bytes() for f in SPLIT_NAMES}


# ---------------------------------------------------------------------------------- drops and counts

def test_truncation_counts_equal_the_trainers_and_drops_are_reported(tmp_path, capsys):
    pytest.importorskip("torch")
    from trainer.tokenizer import ByteTokenizer

    rows = [{"input": "q" * (i % 13) + f"{i}", "output": "a" * (i % 29) + f"{i}", "id": i} for i in range(90)]
    rows += [{"input": "  ", "output": "x", "id": "empty-in"}, {"input": "y", "output": "", "id": "empty-out"},
             dict(rows[3], id="dup"), {"input": "p" * 80, "output": "long prompt", "id": "prompt-fills-it"}]
    src = write_jsonl(tmp_path / "raw.jsonl", rows)
    code, out, _ = sft(src, "--out", tmp_path / "keep", "--seq-length", "40", "--split", "0.8,0.1,0.1", capsys=capsys)
    assert code == 0
    stats = json.loads((tmp_path / "keep" / "stats.json").read_text())
    assert stats["dropped"]["empty"]["count"] == 2 and stats["dropped"]["duplicate"]["count"] == 1
    assert stats["dropped"]["duplicate"]["first"] == [f"{src} line 93"]
    assert "2 empty" in out and "1 duplicate" in out and "kept: the trainer truncates them" in out
    tok = ByteTokenizer()
    truncated = 0
    for split in ("training", "validation", "test"):
        _, ds = trainer_dataset(tmp_path / "keep", split, tok, "chatml", seq_length=40, packing=True)
        mine = stats["splits"][split]
        assert {k: mine[k] for k in ds.stats() if k != "rows"} == {k: v for k, v in ds.stats().items() if k != "rows"}
        truncated += ds.truncated
    assert truncated == stats["records"]["over_long"] > 0
    code, out, _ = sft(src, "--out", tmp_path / "drop", "--seq-length", "40", "--drop-long", "--split", "0.8,0.1,0.1", capsys=capsys)
    stats2 = json.loads((tmp_path / "drop" / "stats.json").read_text())
    assert code == 0 and stats2["dropped"]["long"]["count"] == truncated
    assert sum(s["truncated"] for s in stats2["splits"].values()) == 0
    assert sum(s["records"] for s in stats2["splits"].values()) == 91 - truncated


@pytest.mark.parametrize("template", ["chatml", "plain", "raw"])
def test_batched_token_counts_equal_render_chat_one_by_one(tmp_path, template):
    from dataprep.sft import Example, count_tokens
    from trainer.chat import render_chat
    from trainer.tokenizer import load_tokenizer

    tok = load_tokenizer(str(hf_tokenizer_dir(tmp_path / "tok")))
    examples = [Example("q" * (i % 5) + " <|im_end|> x" * (i % 3), "a" * (i % 4) + "\n", {}, "f", f"line {i}", False) for i in range(23)]
    count_tokens(examples, template, tok, chunk=4)  # chunks share texts ("\n", "assistant\n"): each is encoded again
    for ex in examples:
        p, a = render_chat(template, ex.input, ex.output, tok)
        assert (ex.prompt_tokens, ex.tokens) == (len(p), len(p) + len(a))


def test_summary_and_stats(tmp_path, capsys):
    src = ROOT / "examples" / "data" / "raw_qa.jsonl"
    code, out, _ = sft(src, "--out", tmp_path / "out", "--input-key", "question", "--output-key", "answer", "--seed", "1", capsys=capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("read      60 record(s)") and "metadata carried: id, category" in lines[1]
    assert any(line.startswith("lengths") for line in lines) and any("|#" in line for line in lines)
    assert lines[-1] == f"wrote     {tmp_path / 'out'}: training.jsonl (54), validation.jsonl (3), test.jsonl (3), stats.json"
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["tool"] == "launch data sft" and stats["template"] == "chatml" and stats["seq_length"] == 4096
    assert sum(b["count"] for b in stats["histogram"]) == 60


def test_an_empty_output_directory_is_fine(tmp_path, capsys):
    src = write_jsonl(tmp_path / "raw.jsonl", records(20))
    (tmp_path / "out").mkdir()
    assert sft(src, "--out", tmp_path / "out", capsys=capsys)[0] == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*SPLIT_NAMES, "stats.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw.jsonl"]


# ------------------------------------------------------------------------------------------ pre-flight

def test_preflight_refuses_a_template_other_than_the_data_was_prepared_for(tmp_path, capsys):
    from launcher.cluster import load_profile
    from launcher.preflight import run_preflight
    from launcher.recipe_loader import apply_overrides, load_recipe

    src = write_jsonl(tmp_path / "raw.jsonl", records(40))
    assert sft(src, "--out", tmp_path / "sft", "--template", "plain", capsys=capsys)[0] == 0

    def problems(template):
        r, _ = load_recipe("smoke")
        p = run_preflight(apply_overrides(r, [f"data.path={tmp_path / 'sft'}", f"data.template={template}"]), load_profile("local")[0])
        return [x for x in p.problems if x.field == "data.template"]

    assert problems("plain") == []
    (bad,) = problems("chatml")
    assert bad.severity == "error" and "prepared for 'plain'" in bad.message and "set data.template=plain" in bad.message
    assert [x.message for x in problems("raw")][0].startswith("'raw', but")


# ------------------------------------------------------------------------------------------ bad input

def _bad_cases(tmp_path):
    good = records(20)
    cases = {}

    def case(name, files, argv, words):
        cases[name] = (files, argv, words)

    case("malformed jsonl", {"raw.jsonl": "".join(json.dumps(r) + "\n" for r in good[:2]) + '{"question": "x", oops}\n'},
         ["raw.jsonl"], ["raw.jsonl: line 3: invalid JSON"])
    case("missing key", {"raw.jsonl": "".join(json.dumps(r) + "\n" for r in good[:4]) + json.dumps({"question": "x"}) + "\n"},
         ["raw.jsonl", "--input-key", "question", "--output-key", "answer"], ["raw.jsonl: line 5: field 'answer' is missing"])
    case("wrong type", {"raw.jsonl": json.dumps({"input": ["a"], "output": "b"}) + "\n"}, ["raw.jsonl"],
         ["raw.jsonl: line 1: field 'input': expected text, got list"])
    case("unknown template", {"raw.jsonl": json.dumps(good[0]) + "\n"}, ["raw.jsonl", "--template", "alpaca"], ["--template", "alpaca"])
    case("empty split", {"raw.jsonl": "".join(json.dumps(r) + "\n" for r in good[:5])},
         ["raw.jsonl", "--input-key", "question", "--output-key", "answer"], ["--split: the validation split would be empty"])
    case("emptied split", {"raw.jsonl": "".join(json.dumps({**r, "s": "test" if i == 4 else "train"}) + "\n" for i, r in enumerate(good[:4] + good[:1]))},
         ["raw.jsonl", "--input-key", "question", "--output-key", "answer", "--split-column", "s"], ["--split-column: the test split is empty", "1 duplicate"])
    case("bad split value", {"raw.jsonl": json.dumps({**good[0], "s": "holdout"}) + "\n"},
         ["raw.jsonl", "--input-key", "question", "--output-key", "answer", "--split-column", "s"], ["raw.jsonl: line 1: field 's': 'holdout' is not a split"])
    case("bad ratios", {"raw.jsonl": json.dumps(good[0]) + "\n"}, ["raw.jsonl", "--split", "0.5,0.2"], ["--split: '0.5,0.2'", "sum to 1"])
    case("csv line", {"raw.csv": "question,answer\n1+1?,2\n\"multi\nline\",3\n2+2?,4,extra\n"}, ["raw.csv"],
         ["raw.csv: line 5: 3 fields, the header has 2"])
    case("json shape", {"raw.json": json.dumps({"a": 1})}, ["raw.json"], ["raw.json: expected a list of records"])
    case("json record", {"raw.json": json.dumps([good[0], "text"])}, ["raw.json"], ["raw.json: record 2: expected a JSON object"])
    case("no fields", {"raw.jsonl": json.dumps({"q": "a", "a": "b"}) + "\n"}, ["raw.jsonl"], ["raw.jsonl: line 1: no input/output fields", "--input-key"])
    case("chat ends with user", {"chat.jsonl": json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"},
         ["chat.jsonl"], ["chat.jsonl: line 1: field 'messages': the last message is 'user'"])
    case("chat bad role", {"chat.jsonl": json.dumps({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}) + "\n"},
         ["chat.jsonl"], ["chat.jsonl: line 1: field 'messages', message 1: role 'tool'"])
    case("clashing field", {"raw.jsonl": json.dumps({"question": "a", "answer": "b", "output": "c"}) + "\n"},
         ["raw.jsonl", "--input-key", "question", "--output-key", "answer"], ["raw.jsonl: line 1: field 'output' would be replaced"])
    case("jinja without tokenizer", {"raw.jsonl": json.dumps(good[0]) + "\n"}, ["raw.jsonl", "--template", "jinja"], ["--template: jinja", "--tokenizer DIR"])
    case("no chat template", {"raw.jsonl": json.dumps(good[0]) + "\n", "tok/": None}, ["raw.jsonl", "--template", "jinja", "--tokenizer", "tok"],
         ["tokenizer_config.json: has no chat_template"])
    case("missing source", {}, ["nope.jsonl"], ["nope.jsonl: no such file or directory"])
    case("unknown format", {"raw.xlsx": "x"}, ["raw.xlsx"], ["raw.xlsx: unknown format"])
    case("not a datasets dir", {"plain/x.txt": "x"}, ["plain"], ["plain: a directory, but not one saved by datasets"])
    case("empty file", {"raw.jsonl": "\n"}, ["raw.jsonl"], ["raw.jsonl: has no records"])
    case("not utf-8", {"raw.jsonl": b"\xff\xfe\x00x"}, ["raw.jsonl"], ["raw.jsonl: not UTF-8 text"])
    case("corrupt gzip", {"raw.jsonl.gz": b"not gzip"}, ["raw.jsonl.gz"], ["raw.jsonl.gz: cannot read it"])
    case("no split in the name", {"raw.jsonl": json.dumps(good[0]) + "\n"}, ["raw.jsonl", "--split", "source"],
         ["raw.jsonl: --split source: cannot tell the split from the name 'raw.jsonl'"])
    return cases


@pytest.mark.parametrize("name", list(_bad_cases(Path("/nonexistent"))))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, monkeypatch, name):
    files, argv, words = _bad_cases(tmp_path)[name]
    for rel, content in files.items():
        path = tmp_path / rel
        if content is None:
            hf_tokenizer_dir(path) if rel == "tok/" else path.mkdir()
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, out, err = sft(*argv, "--out", "out/sft", capsys=capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("launch: error: "), err
    for w in words:
        assert w in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written, no staging left


def test_an_existing_non_empty_directory_is_never_touched(tmp_path, capsys):
    src = write_jsonl(tmp_path / "raw.jsonl", records(20))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    code, _, err = sft(src, "--out", tmp_path / "out", capsys=capsys)
    assert code == 2 and "is not empty; launch data sft never overwrites" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


def test_parquet_without_pyarrow_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    path = tmp_path / "raw.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    code, _, err = sft(path, "--out", tmp_path / "out", capsys=capsys)
    assert code == 2 and err.strip() == "launch: error: launch data sft: reading Parquet and Arrow needs pyarrow: pip install pyarrow"
    assert not (tmp_path / "out").exists()


def test_help_has_a_description_and_an_example(capsys):
    assert cli.main(["data", "sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: launch data sft" in out and "examples:" in out and "launch data sft raw.jsonl --out" in out


def test_user_error_type_for_library_use(tmp_path):
    from dataprep.sft import main

    with pytest.raises(UserError, match="no such file"):
        main([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "out")])
