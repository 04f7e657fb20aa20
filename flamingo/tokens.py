"""Special tokens: their strings, how they are added to a tokenizer, and their resolved ids.

Flamingo adds ``<image>`` (marks where an image sits in the text) and ``<|endofchunk|>`` (ends
the text that belongs to an image) to the LM's tokenizer, plus ``<PAD>`` when the tokenizer has
no pad token. They are added in OpenFlamingo's order (``<|endofchunk|>``, ``<image>``, then
``<PAD>``) so that converted OpenFlamingo checkpoints keep their token ids.

LLaVA's (``llava-hf/*``, ``lm.special_tokens: llava``) bring ``<image>``, whose row their LM
already has; the end-of-sequence token ends a chunk.

IDEFICS's tokenizers bring their own (``lm.special_tokens: idefics``):
``<fake_token_around_image>`` and ``<image>`` and, in the instruct releases,
``<end_of_utterance>``, which then plays ``<|endofchunk|>``'s part (else the end-of-sequence
token does); nothing is added but a ``<PAD>`` where the tokenizer has no pad token.

This is the one module that both the LM adapter and the processor import, so tokenizer loading
(including the tiny tokenizer shipped in the package) lives here too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is imported where a tokenizer is loaded: the schema's and the
    from transformers import PreTrainedTokenizerBase  # converters' imports stay light

IMAGE = "<image>"
END_OF_CHUNK = "<|endofchunk|>"
PAD = "<PAD>"
AROUND_IMAGE = "<fake_token_around_image>"
MLLAMA_IMAGE = "<|image|>"
END_OF_UTTERANCE = "<end_of_utterance>"
SCHEMES = ("flamingo", "idefics", "llava", "mllama")
IMAGE_RUN = re.compile(f"(?:{re.escape(IMAGE)})+")

TINY_TOKENIZER = "tiny"
TINY_TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny_tokenizer"


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids resolved against one tokenizer."""

    image_id: int
    end_of_chunk_id: int
    pad_id: int
    new_ids: tuple[int, ...]
    """Ids of the tokens Flamingo added (their embedding rows are trainable), in order."""
    around_image_id: int | None = None
    """``<fake_token_around_image>`` (IDEFICS's prompt form), None otherwise."""
    eos_id: int | None = None
    """The tokenizer's end-of-sequence token (``xattn.reset_after_eos``)."""
    image_text: str = IMAGE
    """How the tokenizer writes an image: ``<image>``, or Llama 3.2 Vision's ``<|image|>``."""

    @classmethod
    def from_tokenizer(
        cls, tokenizer: PreTrainedTokenizerBase, new_ids: tuple[int, ...]
    ) -> SpecialTokens:
        ids = tokenizer.convert_tokens_to_ids([IMAGE, END_OF_CHUNK])
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; call add_special_tokens first")
        return cls(
            image_id=ids[0],
            end_of_chunk_id=ids[1],
            pad_id=tokenizer.pad_token_id,
            new_ids=new_ids,
            eos_id=tokenizer.eos_token_id,
        )


def add_special_tokens(
    tokenizer: PreTrainedTokenizerBase, scheme: str = "flamingo"
) -> SpecialTokens:
    """Add the tokens of ``scheme`` (``lm.special_tokens``) to ``tokenizer`` (in place,
    idempotent) and return their ids.

    ``new_ids`` lists the tokens Flamingo owns: ``<|endofchunk|>``, ``<image>`` and, when it
    had to add one, ``<PAD>``. The model learns an embedding (and output) row for each. With
    ``idefics``, the tokenizer's own IDEFICS tokens (:func:`idefics_tokens`).
    """
    if scheme == "idefics":
        return idefics_tokens(tokenizer)
    if scheme == "llava":
        return llava_tokens(tokenizer)
    if scheme == "mllama":
        return mllama_tokens(tokenizer)
    if scheme != "flamingo":
        raise ValueError(f"lm.special_tokens must be one of {SCHEMES}, got {scheme!r}")
    tokenizer.add_special_tokens({"additional_special_tokens": [END_OF_CHUNK, IMAGE]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD})
    owned = [END_OF_CHUNK, IMAGE] + ([PAD] if tokenizer.pad_token == PAD else [])
    new_ids = tuple(tokenizer.convert_tokens_to_ids(owned))
    return SpecialTokens.from_tokenizer(tokenizer, new_ids)


def idefics_tokens(tokenizer: PreTrainedTokenizerBase) -> SpecialTokens:
    """The ids of IDEFICS's tokens in an IDEFICS tokenizer: ``<fake_token_around_image>``,
    ``<image>``, ``<end_of_utterance>`` when it has it (then the end of a chunk; else the
    end-of-sequence token is), and ``<PAD>`` added if it has no pad token. ``new_ids`` are
    the ones the tokenizer has (IDEFICS's decoupled extra rows), by id."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (AROUND_IMAGE, IMAGE) if t not in vocab]
    if missing:
        raise ValueError(
            f"lm.special_tokens: idefics needs an IDEFICS tokenizer, with {AROUND_IMAGE} and "
            f"{IMAGE}; this one lacks {missing} (use lm.special_tokens: flamingo for any other)"
        )
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(
            "lm.special_tokens: idefics needs a tokenizer with a beginning- and an "
            "end-of-sequence token (IDEFICS's prompts start with one and reset at the other)"
        )
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD})
    owned = [AROUND_IMAGE, IMAGE] + ([END_OF_UTTERANCE] if END_OF_UTTERANCE in vocab else [])
    if tokenizer.pad_token == PAD:
        owned.append(PAD)
    ids = dict(zip(owned, tokenizer.convert_tokens_to_ids(owned), strict=True))
    end_of_chunk = ids.get(END_OF_UTTERANCE, tokenizer.eos_token_id)
    return SpecialTokens(
        image_id=ids[IMAGE],
        end_of_chunk_id=end_of_chunk,
        pad_id=tokenizer.pad_token_id,
        new_ids=tuple(sorted(ids.values())),
        around_image_id=ids[AROUND_IMAGE],
        eos_id=tokenizer.eos_token_id,
    )


def own_image_token(
    tokenizer: PreTrainedTokenizerBase, scheme: str, marker: str, model: str, needs_bos: bool
) -> SpecialTokens:
    """The ids of a tokenizer that brings its own image token ``marker`` (its LM's embedding
    has the row: nothing is new): the end-of-sequence token ends a chunk, and ``<PAD>`` is
    added (and then owned) where it has no pad token. ``model`` names it in errors."""
    if marker not in tokenizer.get_vocab():
        raise ValueError(
            f"lm.special_tokens: {scheme} needs a {model} tokenizer, with {marker} in its "
            "vocabulary; use lm.special_tokens: flamingo to add the tokens to any other"
        )
    if tokenizer.eos_token_id is None or (needs_bos and tokenizer.bos_token is None):
        ends = (
            "a beginning- and an end-of-sequence token" if needs_bos else "an end-of-sequence token"
        )
        raise ValueError(f"lm.special_tokens: {scheme} needs a tokenizer with {ends}")
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD})
    return SpecialTokens(
        image_id=tokenizer.convert_tokens_to_ids(marker),
        end_of_chunk_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        new_ids=(tokenizer.pad_token_id,) if tokenizer.pad_token == PAD else (),
        eos_id=tokenizer.eos_token_id,
        image_text=marker,
    )


def llava_tokens(tokenizer: PreTrainedTokenizerBase) -> SpecialTokens:
    """An ``llava-hf`` tokenizer's: its own ``<image>`` (:func:`own_image_token`)."""
    return own_image_token(tokenizer, "llava", IMAGE, "LLaVA (llava-hf/*)", needs_bos=False)


def mllama_tokens(tokenizer: PreTrainedTokenizerBase) -> SpecialTokens:
    """A Llama 3.2 Vision tokenizer's: its ``<|image|>`` (an input row of the LM's embedding,
    no row of its head), and a start token, which its prompts place after leading images."""
    return own_image_token(tokenizer, "mllama", MLLAMA_IMAGE, "Llama 3.2 Vision", needs_bos=True)


def mllama_prompt(text: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """Text with ``<image>`` markers as ``MllamaProcessor`` gives it to the tokenizer (which
    adds its special tokens): each image ``<|image|>``, and, unless the text holds the start
    token, the start token after the images that open it."""
    text = text.replace(IMAGE, MLLAMA_IMAGE)
    bos = tokenizer.bos_token
    if bos in text:
        return text
    rest, lead = text, 0
    while rest.startswith(MLLAMA_IMAGE):
        rest, lead = rest[len(MLLAMA_IMAGE) :], lead + 1
    return MLLAMA_IMAGE * lead + bos + rest


def chunk_ends(text: str, tokenizer: PreTrainedTokenizerBase, special: SpecialTokens) -> str:
    """``<|endofchunk|>`` written as the token that ends a chunk, where that is another token
    (``lm.special_tokens: llava``: the end-of-sequence token); else ``text`` unchanged."""
    if tokenizer.convert_tokens_to_ids(END_OF_CHUNK) == special.end_of_chunk_id:
        return text
    return text.replace(END_OF_CHUNK, tokenizer.convert_ids_to_tokens(special.end_of_chunk_id))


LEADING_IMAGES = re.compile(f"^(?:{re.escape(IMAGE)})+")


def encode(
    tokenizer: PreTrainedTokenizerBase, text: str, images_before_bos: bool = False
) -> list[int]:
    """``text`` tokenized with the tokenizer's special tokens (its start token, if it adds
    one). With ``images_before_bos`` (``lm.leading_images: before_bos``) the ``<image>`` markers
    that open the text come first and the rest is tokenized on its own, start token
    included: BLIP-2's order, as ``Blip2Processor`` writes it (``[<image> x 32, </s>, text]``
    with OPT's tokenizer), whatever the tokenizer's start token. The processor and the
    training loader both tokenize through here."""
    lead = LEADING_IMAGES.match(text) if images_before_bos else None
    if lead is None:
        return tokenizer(text)["input_ids"]
    images = tokenizer(lead.group(), add_special_tokens=False)["input_ids"]
    return images + tokenizer(text[lead.end() :])["input_ids"]


def expand_images(ids: list[int], image_id: int, count: int) -> list[int]:
    """Each ``<image>`` of ``ids`` written ``count`` times: the LLaVA connector's input, one
    ``<image>`` token per token of the image (1: unchanged)."""
    if count == 1:
        return ids
    out: list[int] = []
    for token in ids:
        out.extend([token] * count if token == image_id else [token])
    return out


def idefics_prompt(text: str, tokenizer: PreTrainedTokenizerBase, special: SpecialTokens) -> str:
    """Text with ``<image>`` markers and ``<|endofchunk|>`` in IDEFICS's prompt form, to be
    tokenized without special tokens added: the beginning-of-sequence token first, each run
    of images as ``<fake_token_around_image><image>`` per image and one closing fake token,
    ``<|endofchunk|>`` as the token that ends a chunk there (``end_of_chunk_id``)."""
    end = tokenizer.convert_ids_to_tokens(special.end_of_chunk_id)
    text = text.replace(END_OF_CHUNK, end)

    def images(run: re.Match) -> str:
        return AROUND_IMAGE + (IMAGE + AROUND_IMAGE) * run[0].count(IMAGE)

    return tokenizer.bos_token + IMAGE_RUN.sub(images, text)


def load_tokenizer(
    source: str,
    revision: str | None = None,
    trust_remote_code: bool = False,
    scheme: str = "flamingo",
):
    """Load a Hugging Face tokenizer and add the special tokens of ``scheme``
    (``lm.special_tokens``).

    ``source`` is a hub id, a local directory, or ``"tiny"`` for the tokenizer that ships with
    the package. Returns ``(tokenizer, SpecialTokens)``.
    """
    path = str(TINY_TOKENIZER_DIR) if source == TINY_TOKENIZER else source
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code
        )
    except OSError as e:
        raise FileNotFoundError(
            f"cannot load tokenizer {source!r}: {e}. Use a local directory, a hub id reachable "
            f"from this machine, or {TINY_TOKENIZER!r} for the packaged tiny tokenizer."
        ) from e
    return tokenizer, add_special_tokens(tokenizer, scheme)
