"""Tokenizers: the built-in byte-level one (tests, smoke run) and a wrapper around Hugging Face ``tokenizers``.

Both expose the same small interface: ``encode(text) -> list[int]`` (never adds special tokens),
``decode(ids) -> str``, ``vocab_size``, ``bos_id`` / ``eos_id`` / ``pad_id`` (``None`` when absent) and
``token_to_id(token) -> int | None``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from launcher.errors import UserError


class ByteTokenizer:
    """Ids 0..255 are UTF-8 bytes, followed by five special tokens; 261 ids in all."""

    SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>")

    def __init__(self):
        self._special = {tok: 256 + i for i, tok in enumerate(self.SPECIAL_TOKENS)}
        self._special_by_id = {i: tok for tok, i in self._special.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in self.SPECIAL_TOKENS) + ")")

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.SPECIAL_TOKENS)

    @property
    def pad_id(self) -> int:
        return self._special["<|pad|>"]

    @property
    def bos_id(self) -> int:
        return self._special["<|bos|>"]

    @property
    def eos_id(self) -> int:
        return self._special["<|eos|>"]

    def token_to_id(self, token: str) -> int | None:
        """A special token's id, a single byte's id, else None."""
        if token in self._special:
            return self._special[token]
        raw = token.encode("utf-8")
        return raw[0] if len(raw) == 1 else None

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes; special-token strings in ``text`` become their ids."""
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self._special:
                ids.append(self._special[part])
            elif part:
                ids.extend(part.encode("utf-8"))
        return ids

    def decode(self, ids) -> str:
        """Inverse of ``encode`` (invalid UTF-8 is replaced)."""
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
            if i not in self._special_by_id:
                raise ValueError(f"token id {i} is out of range for the byte tokenizer (vocab size {self.vocab_size})")
            out.append(self._special_by_id[i])
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


_BOS_NAMES = ("<|begin▁of▁sentence|>", "<s>", "<|begin_of_text|>")
_EOS_NAMES = ("<|end▁of▁sentence|>", "</s>", "<|endoftext|>", "<|end_of_text|>")
_PAD_NAMES = ("<|pad|>", "<pad>", "<|▁pad▁|>")


class HFTokenizer:
    """A ``tokenizer.json`` (Hugging Face ``tokenizers``); bos/eos/pad from ``tokenizer_config.json`` when present."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise UserError("no such file (data.tokenizer is 'byte', a tokenizer.json or a directory holding one)", str(file))
        self.path = file
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception that does not name the file
            raise UserError(f"not a Hugging Face tokenizers file ({' '.join(str(e).split())})", str(file)) from None
        config = self._read_config(file.parent / "tokenizer_config.json")
        self._bos = self._lookup(config.get("bos_token"), _BOS_NAMES)
        self._eos = self._lookup(config.get("eos_token"), _EOS_NAMES)
        self._pad = self._lookup(config.get("pad_token"), _PAD_NAMES)

    @staticmethod
    def _read_config(file: Path) -> dict:
        if not file.is_file():
            return {}
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"not valid JSON: {e}", str(file)) from None
        return data if isinstance(data, dict) else {}

    def _lookup(self, configured, fallbacks: tuple[str, ...]) -> int | None:
        if isinstance(configured, dict):
            configured = configured.get("content")
        if isinstance(configured, str):
            return self._tok.token_to_id(configured)
        for name in fallbacks:
            i = self._tok.token_to_id(name)
            if i is not None:
                return i
        return None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def pad_id(self) -> int | None:
        return self._pad

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without automatically added special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]`` in one call into the Rust library (no offsets computed where it can)."""
        batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # _fast: tokenizers >= 0.21
        return [e.ids for e in batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r})"


def load_tokenizer(spec: str):
    """``"byte"`` -> ByteTokenizer; otherwise a tokenizer.json file or a directory holding one."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError("no such file or directory (data.tokenizer is 'byte', a tokenizer.json or a directory holding one)", str(path))
    return HFTokenizer(path)


# ------------------------------------------------------------------------------ Hugging Face files
# What a model directory carries of its tokenizer (copied as they are, when the run's tokenizer has them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json")
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.43 saves the chat template (it wins over the config's)


def _gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte (what the ByteLevel pre-tokenizer emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in printable else next(extra)) for b in range(256)}


def byte_tokenizer_json() -> str:
    """The built-in byte tokenizer as a ``tokenizers`` tokenizer.json with identical ids: byte-level BPE
    with one token per byte and no merges, the five special tokens as added tokens 256..260."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    chars = _gpt2_byte_chars()
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ByteTokenizer.SPECIAL_TOKENS])
    return tok.to_str()


def write_hf_tokenizer(spec: str, out: Path, chat_template: str | None, model_max_length: int) -> list[str]:
    """Write the run's tokenizer into a Hugging Face model directory ``out``; returns the file names.

    The byte tokenizer becomes an equivalent tokenizer.json; a tokenizer directory's files are copied.
    ``chat_template`` (the run's training template, as Jinja) replaces the one in tokenizer_config.json:
    the fine-tuned model answers in the format it was trained on. ``None`` keeps the source's own template
    (data.template=raw: the data was rendered with it), ``chat_template.jinja`` included.
    """
    import shutil

    out = Path(out)
    tok = load_tokenizer(spec)
    if isinstance(tok, ByteTokenizer):
        (out / "tokenizer.json").write_text(byte_tokenizer_json(), encoding="utf-8")
        special = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "clean_up_tokenization_spaces": False}
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    else:
        src = tok.path.parent
        for name in TOKENIZER_FILES + ((CHAT_TEMPLATE_FILE,) if chat_template is None else ()):
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
        config = HFTokenizer._read_config(src / "tokenizer_config.json") or {"tokenizer_class": "PreTrainedTokenizerFast"}
    config["model_max_length"] = model_max_length
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return sorted(p.name for p in out.iterdir() if p.name in TOKENIZER_FILES + (CHAT_TEMPLATE_FILE,))
