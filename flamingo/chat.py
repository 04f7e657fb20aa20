"""Conversations: turns -> one text in a template, and which of its tokens are targets.

A conversation is a list of turns, ``{"role": "user" | "assistant", "text": ...}``; its image,
if any, goes at the start of the first user turn (``<image>`` and a newline: LLaVA-1.5 moves it
there whatever its place in the data). A template writes the turns into one text:

- ``vicuna_v1`` (LLaVA-1.5, Vicuna's): ``SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT:
  a2</s>``, the system line LLaVA's;
- ``plain`` (LLaVA's stage-1 pairs): ``<image>`` then the reply, nothing else.

Only the assistant's replies, each with the end-of-sequence token that closes it, are targets:
the model learns to answer and to stop, never to write the user's turns. The text is
tokenized whole, as a prompt is at inference, and the targets are the tokens whose characters
fall inside a reply (the tokenizer's offsets: a fast tokenizer is needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flamingo.tokens import IMAGE

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions."
)
ROLES = ("user", "assistant")


@dataclass(frozen=True)
class Template:
    """How the turns of a conversation are written."""

    system: str
    """Text before the first turn."""
    user: str
    """A user turn, ``{text}`` its text."""
    assistant: str
    """What opens an assistant turn (its reply follows, then the end-of-sequence token)."""


TEMPLATES = {
    "vicuna_v1": Template(f"{VICUNA_SYSTEM} ", "USER: {text} ", "ASSISTANT: "),
    "plain": Template("", "{text}", ""),
}


def check_turns(turns: Sequence[dict[str, Any]]) -> None:
    """Turns alternate user, assistant, ..., each a role and a string; an error names the
    first that does not."""
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    for i, turn in enumerate(turns):
        role = turn.get("role") if isinstance(turn, dict) else None
        if role != ROLES[i % 2] or not isinstance(turn.get("text"), str):
            raise ValueError(
                f"turn {i} must be {{'role': {ROLES[i % 2]!r}, 'text': str}} (turns alternate "
                f"user and assistant, the user first), got {turn!r}"
            )


def render(
    turns: Sequence[dict[str, Any]],
    template: str,
    eos: str,
    image: bool,
    generation_prompt: bool = False,
) -> tuple[str, list[tuple[int, int]]]:
    """The text of ``turns`` in ``template`` and the character spans of its targets (each
    assistant reply with its ``eos``). ``image``: an ``<image>`` opens the first user turn.
    ``generation_prompt``: end with an open assistant turn (a prompt to answer)."""
    if template not in TEMPLATES:
        raise ValueError(f"conversation template {template!r} is not one of {sorted(TEMPLATES)}")
    check_turns(turns)
    form = TEMPLATES[template]
    text, spans = form.system, []
    for i, turn in enumerate(turns):
        body = turn["text"].strip()
        if turn["role"] == "user":
            if i == 0 and image:
                body = f"{IMAGE}\n{body}" if template != "plain" else IMAGE
            text += form.user.format(text=body)
        else:
            text += form.assistant
            spans.append((len(text), len(text) + len(body) + len(eos)))
            text += body + eos
    if generation_prompt:
        if turns[-1]["role"] != "user":
            raise ValueError("a generation prompt ends with a user turn")
        text += form.assistant.rstrip(" ")
    return text, spans


def target_tokens(
    tokenizer: Any, text: str, spans: list[tuple[int, int]]
) -> tuple[list[int], list[bool]]:
    """``text`` tokenized (with the tokenizer's special tokens, a BOS) and, per token, whether
    its characters fall inside one of ``spans``."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"conversations need a fast tokenizer (character offsets); {type(tokenizer).__name__} "
            "is not one"
        )
    encoded = tokenizer(text, return_offsets_mapping=True)
    targets = [
        end > start and any(start < b and end > a for a, b in spans)
        for start, end in encoded["offset_mapping"]
    ]
    return encoded["input_ids"], targets
