"""Evaluation protocols: every setting that moves a published number, named, per protocol.

Numbers from different evaluation code differ by points for reasons that have nothing to do
with the model (demonstrations joined with or without a newline, where an answer is cut, which
of three VQA-accuracy variants scores it). A protocol fixes all of them at once, so a score
says which code it is comparable with:

- ``official``: the benchmarks' own evaluation code as their authors publish it today (the
  VQA accuracy of GT-Vision-Lab/VQA ``vqaEval.py`` after its 2021 fix), and this project's
  prompts (the Flamingo paper's formats, Appendix A), whose answers are cut at the end of the
  chunk or at the next prompt.
- ``openflamingo``: what ``open_flamingo/eval/evaluate.py`` does, for comparing against
  OpenFlamingo's and IDEFICS's published tables (``tests/test_protocols.py`` runs its code).

Each field's docstring says what it changes; the protocol table of docs/evaluation.md says where each
value comes from in the reference code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Protocol:
    """The settings of one protocol (:data:`PROTOCOLS`)."""

    name: str
    demo_separator: str
    """What follows each captioning or VQA demonstration: nothing, or a newline (OpenFlamingo;
    its classification demonstrations are joined with nothing)."""
    zero_shot_demos: Literal["random", "like_shots"]
    """How the two text-only demonstrations of a 0-shot prompt are picked: at random, or as
    the k-shot ones are (RICES when ``demos: rices``; OpenFlamingo)."""
    caption_train_splits: tuple[str, ...]
    """Karpathy splits the captioning demonstrations come from."""
    max_new_tokens: dict[str, int] = field(default_factory=dict)
    """Generation budget per task (a task config's ``max_new_tokens`` overrides it)."""
    vqa_postprocess: Literal["flamingo", "openflamingo"] = "flamingo"
    """Where a VQA answer is cut: at ``<|endofchunk|>``, ``Question:``/``Answer:``/
    ``Output:``/``Short answer:`` or a newline (``flamingo``); at the first ``Question``,
    ``Answer`` or ``Short`` and then at the first ``", "`` (``openflamingo``)."""
    caption_postprocess: Literal["flamingo", "openflamingo"] = "flamingo"
    """Where a caption is cut: as a VQA answer but for newlines (``flamingo``); at the first
    ``Output``, double quotes removed (``openflamingo``)."""
    vqa_metric: Literal["official", "official_2016", "openflamingo"] = "official"
    """The VQA-accuracy variant (:func:`eval.metrics.vqa_accuracy`)."""
    classification_prompt: Literal["a_photo_of", "output"] = "a_photo_of"
    """ImageNet's prompt: ``<image>A photo of {class}`` or ``<image>Output:{class}``
    (OpenFlamingo)."""
    class_ranking: Literal["sum", "mean"] = "sum"
    """Classes (ImageNet, HatefulMemes' yes/no) ranked by the summed log-likelihood of their
    tokens, or by its mean per token (OpenFlamingo's ``normalize_length=True``)."""
    unsupported: dict[str, str] = field(default_factory=dict)
    """Tasks this protocol cannot run yet, and why."""


PROTOCOLS: dict[str, Protocol] = {
    "official": Protocol(
        name="official",
        demo_separator="",
        zero_shot_demos="random",
        caption_train_splits=("train", "restval"),
        max_new_tokens={
            "coco": 20,
            "flickr30k": 20,
            "vqav2": 5,
            "okvqa": 5,
            "textvqa": 10,
            "vizwiz": 10,
        },  # fmt: skip
        vqa_postprocess="flamingo",
        caption_postprocess="flamingo",
        vqa_metric="official",
    ),
    "openflamingo": Protocol(
        name="openflamingo",
        demo_separator="\n",
        zero_shot_demos="like_shots",
        caption_train_splits=("train",),
        max_new_tokens={
            "coco": 20,
            "flickr30k": 20,
            "vqav2": 5,
            "okvqa": 5,
            "textvqa": 10,
            "vizwiz": 5,
        },  # fmt: skip
        vqa_postprocess="openflamingo",
        caption_postprocess="openflamingo",
        vqa_metric="openflamingo",
        classification_prompt="output",
        class_ranking="mean",
        unsupported={
            "okvqa": "OpenFlamingo stems OK-VQA answers with its own stemmer (NLTK's tokenizer, "
            "tagger and WordNet lemmatizer plus the inflection package), whose NLTK data is "
            "downloaded at run time; not reproduced yet: run okvqa under protocol: official",
        },
    ),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]
