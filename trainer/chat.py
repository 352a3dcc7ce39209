"""Chat templates: how an SFT exchange becomes token ids (torch-free; ``launch`` checks prompt lengths with it).

Each template exists twice and the two agree token for token: :func:`render_chat` (what training,
generation and evaluation feed the model) and a Jinja ``chat_template`` (what an export writes into
``tokenizer_config.json``, so transformers' ``apply_chat_template`` and serving stacks build the same
prompts). :func:`stop_ids` are the tokens that end an answer.

``raw`` takes ``input``/``output`` as already rendered text (``launch data sft --template jinja`` writes them
with a tokenizer's own chat template): it adds nothing, not even bos, and its Jinja twin is that tokenizer's
own ``chat_template``, which an export keeps (there is no entry for it in :data:`JINJA`).
"""

from __future__ import annotations

TEMPLATES = ("chatml", "plain", "raw")

# transformers renders these with bos_token/eos_token and add_generation_prompt in scope.
JINJA = {
    "chatml": ("{% if bos_token %}{{ bos_token }}{% endif %}"
               "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "plain": ("{% if bos_token %}{{ bos_token }}{% endif %}"
              "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
              "{% else %}{{ message['content'] }}\n{% endif %}{% endfor %}"),
}


def _special(tok, text: str) -> list[int]:
    """The token's id when the tokenizer has it as one token, else the ids of its literal text."""
    i = tok.token_to_id(text)
    return [i] if i is not None else tok.encode(text)


def render_chat(template: str, prompt: str, answer: str, tok) -> tuple[list[int], list[int]]:
    """Token ids of (prompt part, answer part) of one exchange; chatml and plain start the prompt with bos if there is one.

    chatml: ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n`` + ``{answer}<|im_end|>\\n``;
    plain: ``{prompt}\\n`` + ``{answer}<eos>``; raw: ``{prompt}`` + ``{answer}``, nothing added (no bos either:
    special-token text in them, such as a rendered template's bos, becomes its id).
    """
    if template == "raw":
        return tok.encode(prompt), tok.encode(answer)
    prompt_ids = [tok.bos_id] if tok.bos_id is not None else []
    if template == "chatml":
        start, end = _special(tok, "<|im_start|>"), _special(tok, "<|im_end|>")
        newline = tok.encode("\n")
        prompt_ids += start + tok.encode("user\n" + prompt) + end + newline + start + tok.encode("assistant\n")
        answer_ids = tok.encode(answer) + end + newline
    elif template == "plain":
        prompt_ids += tok.encode(prompt + "\n")
        answer_ids = tok.encode(answer) + ([tok.eos_id] if tok.eos_id is not None else [])
    else:
        raise ValueError(f"unknown chat template {template!r} (expected one of {', '.join(TEMPLATES)})")
    return prompt_ids, answer_ids


def stop_ids(template: str | None, tok) -> list[int]:
    """Token ids that end a generated answer: eos, and chatml's ``<|im_end|>`` when it is one token."""
    ids = [tok.eos_id] if tok.eos_id is not None else []
    if template == "chatml":
        end = tok.token_to_id("<|im_end|>")
        if end is not None and end not in ids:
            ids.append(end)
    return ids
