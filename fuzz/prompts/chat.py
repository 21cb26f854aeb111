"""Chat turns rendered as the model's own template renders them, into a prompt to screen.

A Hugging Face directory's tokenizer (tokenizer_config.json's `chat_template`, or a
chat_template.jinja beside it) is rendered with Jinja in a sandbox, as transformers renders it
(`messages`, `bos_token`, `eos_token`, `add_generation_prompt=True`, `raise_exception`). Every
other model gets Gemma's template, which has no system role: a system turn's text opens the first
user turn, followed by a blank line (as google's Gemma 2 and 3 templates do), "assistant" is the
"model" role, and the render ends with the open model turn.

A render that starts with the BOS token's text carries its BOS: the prompt is fed with add_bos
and without that text, so BOS is position 0 as in every other prompt (and a failure there is the
BOS signature). One user turn under Gemma's template is PromptSpec(content, chat=True): the form
`check --chat` and the minimizer know (it keeps the template whole).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from fuzz.verdict import PromptSpec

Turn = tuple[str, str]  # (role, content)
BOS_TEXT = "<bos>"
EOS_TEXT = "<eos>"


class TemplateError(ValueError):
    """The chat cannot be rendered by the template (the message says why)."""


def gemma_render(messages: Sequence[Turn]) -> str:
    """Gemma's chat template (google/gemma-3's tokenizer_config.json), with the open model turn:
    '<bos><start_of_turn>user\\n{system}\\n\\n{user}<end_of_turn>\\n<start_of_turn>model\\n'."""
    turns = list(messages)
    prefix = ""
    if turns and turns[0][0] == "system":
        prefix = turns[0][1] + "\n\n"
        turns = turns[1:]
    out = [BOS_TEXT]
    for i, (role, content) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "model"
        role = "model" if role == "assistant" else role
        if role != expected:
            raise TemplateError(f"turn {i + 1} is {role!r}: Gemma's template needs the roles to "
                                "alternate user/model (after an optional first system turn)")
        out.append(f"<start_of_turn>{role}\n{prefix if i == 0 else ''}{content.strip()}"
                   "<end_of_turn>\n")
    out.append("<start_of_turn>model\n")
    return "".join(out)


def jinja_render(template: str, messages: Sequence[Turn]) -> str:
    """A transformers-style chat template, rendered in Jinja's sandbox."""
    from jinja2 import TemplateError as JinjaError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=[{"role": r, "content": c} for r, c in messages], bos_token=BOS_TEXT,
            eos_token=EOS_TEXT, add_generation_prompt=True)
    except JinjaError as err:
        raise TemplateError(f"the model's chat template failed: {err}") from None


def chat_spec(messages: Sequence[Turn], template: Optional[str] = None) -> PromptSpec:
    """The prompt to feed for these turns under the model's template (None: Gemma's)."""
    if template is None and len(messages) == 1 and messages[0][0] == "user":
        return PromptSpec(messages[0][1].strip(), add_bos=True, chat=True)
    text = gemma_render(messages) if template is None else jinja_render(template, messages)
    if text.startswith(BOS_TEXT):
        return PromptSpec(text[len(BOS_TEXT):], add_bos=True)
    return PromptSpec(text, add_bos=False)
