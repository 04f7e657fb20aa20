"""Special tokens: their strings, how they are added to a tokenizer, and their resolved ids.

Flamingo adds ``<image>`` (marks where an image sits in the text) and ``<|endofchunk|>`` (ends
the text that belongs to an image) to the LM's tokenizer, plus ``<PAD>`` when the tokenizer has
no pad token. They are added in OpenFlamingo's order (``<|endofchunk|>``, ``<image>``, then
``<PAD>``) so that converted OpenFlamingo checkpoints keep their token ids.

This is the one module that both the LM adapter and the processor import, so tokenizer loading
(including the tiny tokenizer shipped in the package) lives here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

IMAGE = "<image>"
END_OF_CHUNK = "<|endofchunk|>"
PAD = "<PAD>"

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

    @classmethod
    def from_tokenizer(
        cls, tokenizer: PreTrainedTokenizerBase, new_ids: tuple[int, ...]
    ) -> SpecialTokens:
        ids = tokenizer.convert_tokens_to_ids([IMAGE, END_OF_CHUNK])
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; call add_special_tokens first")
        return cls(
            image_id=ids[0], end_of_chunk_id=ids[1], pad_id=tokenizer.pad_token_id, new_ids=new_ids
        )


def add_special_tokens(tokenizer: PreTrainedTokenizerBase) -> SpecialTokens:
    """Add Flamingo's tokens to ``tokenizer`` (in place, idempotent) and return their ids.

    ``new_ids`` lists the tokens Flamingo owns: ``<|endofchunk|>``, ``<image>`` and, when it
    had to add one, ``<PAD>``. The model learns an embedding (and output) row for each.
    """
    tokenizer.add_special_tokens({"additional_special_tokens": [END_OF_CHUNK, IMAGE]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD})
    owned = [END_OF_CHUNK, IMAGE] + ([PAD] if tokenizer.pad_token == PAD else [])
    new_ids = tuple(tokenizer.convert_tokens_to_ids(owned))
    return SpecialTokens.from_tokenizer(tokenizer, new_ids)


def load_tokenizer(source: str, revision: str | None = None, trust_remote_code: bool = False):
    """Load a Hugging Face tokenizer and add Flamingo's special tokens.

    ``source`` is a hub id, a local directory, or ``"tiny"`` for the tokenizer that ships with
    the package. Returns ``(tokenizer, SpecialTokens)``.
    """
    path = str(TINY_TOKENIZER_DIR) if source == TINY_TOKENIZER else source
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code
        )
    except OSError as e:
        raise FileNotFoundError(
            f"cannot load tokenizer {source!r}: {e}. Use a local directory, a hub id reachable "
            f"from this machine, or {TINY_TOKENIZER!r} for the packaged tiny tokenizer."
        ) from e
    return tokenizer, add_special_tokens(tokenizer)
