"""Interleaved text + images -> model tensors, and token ids -> text.

Text marks where each image sits with ``<image>``; the images of each sequence come in the same
order as its markers. A media item is one PIL image or a list of PIL frames (video)::

    processor = FlamingoProcessor.from_config(cfg)
    batch = processor(
        text=["<image>A red circle.<|endofchunk|><image>A", "<image>Question: ..."],
        images=[[img1, img2], [img3]],
    )
    batch["input_ids"], batch["attention_mask"]  # (B, T)
    batch["pixel_values"]  # (M, F, C, H, W): the batch's 3 images, flat, sequence by sequence
    batch["media_slots"]  # (B, N) = [[0, 1], [2, -1]]: where each sequence's n-th item is

Only real media are preprocessed and encoded; a slot past a sequence's own media is -1, and
the model gives it zero latents that no ``<image>`` token points at. A tiled tower (Llama 3.2
Vision's) cuts each image into tiles (F) and adds ``batch["aspect_ratio_ids"]`` (M,); its
texts take that model's form (``lm.special_tokens: mllama``: ``<|image|>`` per image, written
as ``<image>`` or itself, the start token after the images that open a text).

With ``lm.special_tokens: idefics`` the same text is written in IDEFICS's prompt form before it
is tokenized: the tokenizer's beginning-of-sequence token first, each run of ``<image>``
markers as ``<fake_token_around_image><image>`` per image and one closing fake token, and
``<|endofchunk|>`` as the token that ends a chunk there. :meth:`FlamingoProcessor.interleaved`
takes IDEFICS's own input, a list of strings and images per sequence.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

import flamingo.formats as formats
from flamingo.chat import TEMPLATES, check_turns, render
from flamingo.checkpoint import read_checkpoint_config
from flamingo.config import FlamingoConfig, VisionConfig
from flamingo.hub import snapshot
from flamingo.media import media_slots
from flamingo.parts import Tower, parts_of, tower_of
from flamingo.tokens import (
    END_OF_UTTERANCE,
    IMAGE,
    MLLAMA_IMAGE,
    SpecialTokens,
    chunk_ends,
    encode,
    idefics_prompt,
    load_tokenizer,
    mllama_prompt,
)

Media = Image.Image | Sequence[Image.Image]
PROCESSOR_CONFIG = "processor_config.json"


class FlamingoProcessor:
    """Tokenizer (with Flamingo's special tokens) + the vision tower's image transform."""

    def __init__(
        self,
        tokenizer: Any,
        special_tokens: SpecialTokens,
        vision_cfg: VisionConfig,
        padding_side: Literal["left", "right"] = "left",
        image_tokens: int = 1,
        images_before_bos: bool = False,
        tower: Tower | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.images_before_bos = images_before_bos
        """The images that open a text come before the tokenizer's start token
        (``lm.leading_images: before_bos``, BLIP-2's order; :func:`flamingo.tokens.encode`)."""
        self.image_tokens = image_tokens
        """``<image>`` tokens per image in the tokenized text: 1 (Flamingo), or the tower's
        tokens per image (the LLaVA connector, whose projected tokens take their places)."""
        self.special_tokens = special_tokens
        self.vision_cfg = vision_cfg
        self.tower = tower if tower is not None else tower_of(vision_cfg)
        """The tower's preprocessing (a tiled tower's tiles and aspect-ratio ids)."""
        self.image_transform = self.tower.image_transform()
        self.padding_side = padding_side

    @classmethod
    def from_config(
        cls, cfg: FlamingoConfig, padding_side: Literal["left", "right"] = "left"
    ) -> FlamingoProcessor:
        tokenizer, special = load_tokenizer(
            cfg.lm.tokenizer_source(),
            cfg.lm.revision,
            cfg.lm.trust_remote_code,
            cfg.lm.special_tokens,
        )
        parts = parts_of(cfg)
        image_tokens = parts.image_tokens()  # 1, or the connector's tokens (spliced)
        before_bos = cfg.lm.leading_images == "before_bos"
        return cls(
            tokenizer, special, cfg.vision, padding_side, image_tokens, before_bos, parts.tower
        )

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, revision: str | None = None
    ) -> FlamingoProcessor:
        """The processor saved with a checkpoint (its tokenizer and settings): a directory or
        a Hub repo id in our format (:func:`flamingo.hub.snapshot`), or in a registered foreign
        format (:mod:`flamingo.formats`: IDEFICS's, LLaVA's, BLIP-2's)."""
        kind = formats.kind_of(directory, revision)
        if kind == "openflamingo":
            raise ValueError(
                f"{directory} is an OpenFlamingo release, converted by "
                f"Flamingo.from_pretrained({str(directory)!r}); its processor is "
                "FlamingoProcessor.from_config(model.cfg)"
            )
        if kind is not None:  # a foreign format's own tokenizer and settings
            return cls.from_config(formats.foreign_config(kind, directory, revision))
        directory = snapshot(directory, revision)
        cfg, _ = read_checkpoint_config(directory)
        cfg = cfg.replace({"lm.tokenizer": str(directory)})
        settings_path = directory / PROCESSOR_CONFIG
        settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
        return cls.from_config(cfg, padding_side=settings.get("padding_side", "left"))

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the tokenizer files and ``processor_config.json`` to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(directory))
        settings = {"padding_side": self.padding_side}
        (directory / PROCESSOR_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")

    # -- images -------------------------------------------------------------------------------

    def preprocess_media(self, media: Media) -> torch.Tensor:
        """One image or a list of frames -> (F, C, H, W) (a tiled tower's tiles for F)."""
        return self._media(media)[0]

    def _media(self, media: Media) -> tuple[torch.Tensor, int | None]:
        """One image or a list of frames -> (F, C, H, W) and its aspect-ratio id (a tiled
        tower's; else None)."""
        if isinstance(media, Image.Image):
            return self.tower.preprocess(media)
        frames = list(media) if isinstance(media, Sequence) else []
        if not frames or not all(isinstance(f, Image.Image) for f in frames):
            raise ValueError(
                f"a media item must be a PIL image or a non-empty list of PIL images, got {media!r}"
            )
        items = [self.tower.preprocess(f) for f in frames]
        if len(items) > 1 and items[0][1] is not None:
            raise ValueError(
                f"vision.kind: {self.vision_cfg.kind} cuts each image into tiles; it takes "
                "single images, not video"
            )
        return torch.cat([t for t, _ in items]), items[0][1]

    def preprocess_images(
        self, images: Sequence[Sequence[Media]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-sequence lists of media -> the flat layout of ``Flamingo.encode_media``:
        ``pixel_values (M, F, C, H, W)`` (every real item, sequence by sequence),
        ``media_slots (B, N)`` (where sequence b's n-th item is in them; -1 past its last) and,
        for a tiled tower, ``aspect_ratio_ids (M,)`` (else None)."""
        per_seq = [[self._media(m) for m in seq] for seq in images]
        frame_counts = {t.shape[0] for seq in per_seq for t, _ in seq}
        if len(frame_counts) > 1:
            raise ValueError(
                f"all media in a batch must have the same number of frames, got {sorted(frame_counts)}"
            )
        counts = [len(seq) for seq in per_seq]
        flat = [item for seq in per_seq for item in seq]
        ratios = [r for _, r in flat]
        ids = None if ratios[0] is None else torch.tensor(ratios, dtype=torch.long)
        return torch.stack([t for t, _ in flat]), media_slots(counts), ids

    # -- text ---------------------------------------------------------------------------------

    @property
    def idefics_form(self) -> bool:
        """Whether prompts take IDEFICS's form (``lm.special_tokens: idefics``)."""
        return self.special_tokens.around_image_id is not None

    def prompt_text(self, text: str) -> str:
        """``text`` (``<image>`` markers, ``<|endofchunk|>``) as the tokenizer is given it: as
        it is, in IDEFICS's prompt form (:func:`flamingo.tokens.idefics_prompt`), or with
        ``<|endofchunk|>`` written as the token that ends a chunk where the tokenizer has no
        such token of its own (``lm.special_tokens: llava``); each ``<image>`` written
        :attr:`image_tokens` times."""
        if self.idefics_form:
            return idefics_prompt(text, self.tokenizer, self.special_tokens)
        text = chunk_ends(text, self.tokenizer, self.special_tokens)
        if self.special_tokens.image_text == MLLAMA_IMAGE:
            return mllama_prompt(text, self.tokenizer)
        return text.replace(IMAGE, IMAGE * self.image_tokens)

    def interleaved(
        self,
        sequences: Sequence[Sequence[str | Media]],
        add_end_of_utterance_token: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """A batch given as IDEFICS's processor takes it: per sequence, a list of strings and
        media items in order. Strings lose their surrounding spaces and, with
        ``add_end_of_utterance_token`` (default: when the tokenizer has the token), a string
        that follows a string is preceded by ``<end_of_utterance>`` (IDEFICS's rules, so the
        same list gives the same ``input_ids``). ``kwargs`` go to :meth:`__call__`."""
        if add_end_of_utterance_token is None:
            add_end_of_utterance_token = END_OF_UTTERANCE in self.tokenizer.get_vocab()
        texts, images = [], []
        for sequence in sequences:
            text, media, last_was_text = "", [], False
            for item in sequence:
                if isinstance(item, str):
                    if add_end_of_utterance_token and last_was_text:
                        text += END_OF_UTTERANCE
                    text += item.strip(" ")
                    last_was_text = True
                else:
                    text += IMAGE
                    media.append(item)
                    last_was_text = False
            texts.append(text)
            images.append(media)
        return self(texts, images, **kwargs)

    def __call__(
        self,
        text: str | Sequence[str],
        images: Sequence[Sequence[Media]] | None = None,
        padding_side: Literal["left", "right"] | None = None,
        max_length: int | None = None,
        add_special_tokens: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Tokenize a batch of interleaved sequences and preprocess their media.

        Returns ``input_ids`` and ``attention_mask`` (B, T) and, when images are given, the
        batch's media flat: ``pixel_values (M, F, C, H, W)`` and ``media_slots (B, N)``
        (:meth:`preprocess_images`), and for a tiled tower (Llama 3.2 Vision's) the images'
        ``aspect_ratio_ids (M,)``; pass the batch as it is (``model(**batch)``,
        ``model.generate(**batch)``). ``max_length`` truncates from the right; it is an
        error if that cuts an ``<image>`` marker off (its image would be orphaned).
        ``add_special_tokens=False``: the texts hold the tokenizer's own (a rendered chat).
        """
        texts = [text] if isinstance(text, str) else list(text)
        if self.special_tokens.image_text != IMAGE:  # the tokenizer's own marker is one too
            texts = [t.replace(self.special_tokens.image_text, IMAGE) for t in texts]
        if images is not None:
            flat = [type(m).__name__ for m in images if not isinstance(m, (list, tuple))]
            if flat:
                raise ValueError(
                    f"images takes one list of media per text, got a flat list ({flat[0]} "
                    "items): images=[[image]] for one text with one image, "
                    "images=[[a, b], [c]] for two texts"
                )
            if len(images) != len(texts):
                raise ValueError(f"got {len(texts)} texts but {len(images)} image lists")
        for i, t in enumerate(texts):
            markers = t.count(IMAGE)
            given = 0 if images is None else len(images[i])
            if markers != given:
                raise ValueError(
                    f"sequence {i} has {markers} {IMAGE} marker(s) but {given} image(s); "
                    f"put one {IMAGE} in the text where each image belongs"
                )
        side = padding_side or self.padding_side
        if self.images_before_bos:
            batch = self._pad(
                [encode(self.tokenizer, self.prompt_text(t), True) for t in texts], side, max_length
            )
        else:
            encoded = self.tokenizer(
                [self.prompt_text(t) for t in texts],
                # IDEFICS's form starts with the BOS itself
                add_special_tokens=add_special_tokens and not self.idefics_form,
                padding="longest",
                padding_side=side,
                truncation=max_length is not None,
                max_length=max_length,
                return_tensors="pt",
            )
            batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if max_length is not None:
            kept = (batch["input_ids"] == self.special_tokens.image_id).sum(-1).tolist()
            for i, t in enumerate(texts):
                if kept[i] != t.count(IMAGE) * self.image_tokens:
                    raise ValueError(
                        f"sequence {i}: max_length={max_length} truncates away {IMAGE} markers; "
                        "raise max_length or give fewer images"
                    )
        if images is not None and any(len(seq) for seq in images):
            pixels, slots, ratios = self.preprocess_images(images)
            batch["pixel_values"], batch["media_slots"] = pixels, slots
            if ratios is not None:
                batch["aspect_ratio_ids"] = ratios
        return batch

    def _pad(
        self, rows: list[list[int]], side: str, max_length: int | None
    ) -> dict[str, torch.Tensor]:
        """Token rows cut to ``max_length`` (from the right) and padded to the longest."""
        rows = [row[:max_length] if max_length is not None else row for row in rows]
        width = max(map(len, rows), default=0)
        ids = torch.full((len(rows), width), self.special_tokens.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, row in enumerate(rows):
            span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            ids[b, span], mask[b, span] = torch.tensor(row, dtype=torch.long), 1
        return {"input_ids": ids, "attention_mask": mask}

    def chat(
        self,
        conversations: Sequence[Sequence[dict[str, str]]],
        images: Sequence[Image.Image | None] | None = None,
        template: str = "vicuna_v1",
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """A batch of conversations, each ending with a user turn, written in ``template``
        (:mod:`flamingo.chat`) with an open assistant turn to generate the reply; its image
        (one or None per conversation) opens the first user turn, as in training. Generate
        with ``eos_token_id=processor.tokenizer.eos_token_id``: a reply ends there. ``kwargs``
        go to :meth:`__call__`.

        ``template="checkpoint"`` writes them with the tokenizer's own chat template (Llama 3.2
        Vision Instruct's, saved with its tokenizer), an image as an ``{"type": "image"}`` item
        opening the first user turn, and tokenizes the result as transformers' processors do:
        without adding the start token when the text begins with it."""
        images = list(images) if images is not None else [None] * len(conversations)
        if len(images) != len(conversations):
            raise ValueError(f"got {len(conversations)} conversations but {len(images)} images")
        media = [[image] if image is not None else [] for image in images]
        if template == "checkpoint":
            texts = [
                self._checkpoint_chat(turns, image is not None)
                for turns, image in zip(conversations, images, strict=True)
            ]
            bos = self.tokenizer.bos_token
            own = bos is not None and all(t.startswith(bos) for t in texts)
            return self(texts, media, add_special_tokens=not own, **kwargs)
        eos = self.tokenizer.eos_token or ""
        texts = [
            render(turns, template, eos, image is not None, generation_prompt=True)[0]
            for turns, image in zip(conversations, images, strict=True)
        ]
        return self(texts, media, **kwargs)

    def _checkpoint_chat(self, turns: Sequence[dict[str, str]], image: bool) -> str:
        """One conversation in the tokenizer's own chat template, an open assistant turn last."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                "template='checkpoint' uses the tokenizer's own chat template, and this "
                f"tokenizer has none: use one of {sorted(TEMPLATES)}"
            )
        check_turns(turns)
        if turns[-1]["role"] != "user":
            raise ValueError("a generation prompt ends with a user turn")
        messages = []
        for i, turn in enumerate(turns):
            content = [{"type": "image"}] if i == 0 and image else []
            content.append({"type": "text", "text": turn["text"]})
            messages.append({"role": turn["role"], "content": content})
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def decode(
        self, token_ids: torch.Tensor | Sequence[int], skip_special_tokens: bool = False
    ) -> str:
        """Token ids of one sequence -> text (padding removed)."""
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        ids = [i for i in ids if i != self.special_tokens.pad_id]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, token_ids: torch.Tensor, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(row, skip_special_tokens) for row in token_ids]
