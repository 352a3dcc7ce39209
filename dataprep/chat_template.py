"""The Jinja ``chat_template`` of a Hugging Face tokenizer directory, rendered as transformers'
``apply_chat_template`` renders it: a sandboxed, immutable jinja2 environment with trim_blocks and
lstrip_blocks, ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text, the
``{% generation %}`` tag, and the special tokens of ``tokenizer_config.json`` (``bos_token``,
``eos_token``, ...) in scope.
"""

from __future__ import annotations

import json
from pathlib import Path

from launcher.errors import UserError
from trainer.tokenizer import CHAT_TEMPLATE_FILE

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplate:
    """``render(messages, add_generation_prompt)`` -> text, with the template found in ``directory``:
    ``chat_template.jinja`` if present (where transformers 4.43+ saves it), else tokenizer_config.json's
    ``chat_template`` (a string, or a list of named templates: the ``default`` one)."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        if directory.is_file():
            directory = directory.parent
        config_file = directory / "tokenizer_config.json"
        config = {}
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise UserError(f"not valid JSON: {e}", str(config_file)) from None
            config = config if isinstance(config, dict) else {}
        jinja_file = directory / CHAT_TEMPLATE_FILE
        if jinja_file.is_file():
            self.source, source = str(jinja_file), jinja_file.read_text(encoding="utf-8")
        else:
            self.source, source = str(config_file), config.get("chat_template")
            if isinstance(source, list):
                named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
                source = named.get("default")
            if not isinstance(source, str) or not source.strip():
                raise UserError("has no chat_template (--template jinja renders the tokenizer's own chat template; "
                                "use chatml or plain for a tokenizer without one)", str(config_file))
        self.special = {k: _token_text(config.get(k)) for k in SPECIAL_KEYS}
        self._template = _compile(source, self.source)

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The text of ``messages``; the template's own refusals (``raise_exception``) raise ValueError."""
        from jinja2 import TemplateError

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special)
        except TemplateError as e:
            raise ValueError(f"the chat template of {self.source} refused it: {e}") from None


def _token_text(value) -> str:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _compile(source: str, where: str):
    from datetime import datetime

    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` (marks assistant text for transformers' masks): its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"chat_template: not a valid Jinja template (line {e.lineno}: {e.message})", where) from None
