"""Prompt formats, in one place (Flamingo paper App. A / OpenFlamingo's evaluation).

Captioning: ``<image>Output:{caption}<|endofchunk|>``; VQA: ``<image>Question:{q} Short
answer:{a}<|endofchunk|>``; classification: ``<image>A photo of {class}<|endofchunk|>``;
HatefulMemes: ``<image>is an image with: '{text}' written on it. Is it hateful? Answer:{a}``.
A demonstration has its answer filled in; the query stops where the model continues. How
demonstrations are joined and where an answer is cut is the protocol's (``eval/protocols.py``).
"""

from __future__ import annotations

import re

from eval.item import Item
from flamingo.tokens import END_OF_CHUNK, IMAGE


def render(
    kind: str, item: Item, with_answer: bool, task: str = "", classification: str = "a_photo_of"
) -> str:
    """One demonstration (``with_answer``) or the query; ``classification``: ImageNet's prompt,
    ``A photo of {class}`` or OpenFlamingo's ``Output:{class}``."""
    answer = item.answers[0] if item.answers else ""
    if kind == "caption":
        body, ans = "Output:", answer
    elif kind == "vqa":
        body, ans = f"Question:{item.question} Short answer:", answer
    elif kind == "classification" and classification == "output":
        body, ans = "Output:", answer
    elif kind == "classification":
        body, ans = "A photo of", f" {answer}"
    elif kind == "binary":
        body, ans = f"is an image with: '{item.text}' written on it. Is it hateful? Answer:", answer
    else:
        raise ValueError(f"unknown task kind {kind!r}")
    return f"{IMAGE}{body}{ans}{END_OF_CHUNK}" if with_answer else f"{IMAGE}{body}"


def class_continuation(kind: str, name: str, classification: str = "a_photo_of") -> str:
    """The text a class is scored as after the query prompt of :func:`render`."""
    return f" {name}" if kind == "classification" and classification == "a_photo_of" else name


def text_only(prompt: str) -> str:
    """A demonstration with its image removed (the paper's 0-shot: two text-only demos)."""
    return prompt.replace(IMAGE, "")


def postprocess(kind: str, generated: str, style: str = "flamingo") -> str:
    """The answer part of a generation. ``flamingo``: cut at the end of the chunk or a new
    prompt (and, for VQA, a newline), stripped. ``openflamingo``: OpenFlamingo's
    (``vqa_metric.postprocess_vqa_generation``, ``coco_metric.postprocess_captioning_generation``
    and the quote removal after it), on the text before the end of the chunk, where its
    generation stops."""
    text = generated.split(END_OF_CHUNK)[0]
    if style == "openflamingo":
        if kind == "vqa":
            text = re.split("Question|Answer|Short", text, maxsplit=1)[0]
            return re.split(", ", text, maxsplit=1)[0]
        return text.split("Output", 1)[0].replace('"', "")
    text = re.split(r"Question:|Answer:|Output:|Short answer:", text)[0]
    if kind == "vqa":
        text = text.split("\n")[0]
    return text.strip()
