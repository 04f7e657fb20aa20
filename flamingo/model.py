"""The Flamingo model: composition, freeze policy, forward to logits (paper Sec. 2, Fig. 3).

``pixel_values -> tower (frozen) -> connector -> media_latents``, read by the frozen LM through
the fusion: the parts of ``flamingo.parts`` the config composes (``connector: flamingo``, the
paper's: the Perceiver Resampler and gated cross-attention blocks inside the LM). Only the
connector, the fusion's modules and the new token rows train (and the LM, or adapters in it,
where ``lm.trainable`` says). The model returns logits; the loss is the framework's
(``flamingo.losses``).

The model never wraps itself for distributed training: :meth:`Flamingo.wrap_unit_classes`
declares the modules an engine may shard or checkpoint one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

import flamingo.formats as formats
import flamingo.hub as hub
from flamingo.checkpoint import (
    FROZEN_NAME,
    TRAINABLE_NAME,
    load_tensors,
    read_checkpoint_config,
    save_tensors,
    write_checkpoint_config,
)
from flamingo.config import FlamingoConfig
from flamingo.generation import generate, score
from flamingo.layers import DEFAULT_POLICY, ExecutionPolicy, compile_each, set_policy, torch_dtype
from flamingo.lm import FlamingoLM, build_causal_lm
from flamingo.lora import adapter_modules, add_adapters
from flamingo.media import place_in_slots
from flamingo.parts import LMCall, Parts, parts_of
from flamingo.processing import FlamingoProcessor
from flamingo.tokens import SpecialTokens
from flamingo.vision import VisionEncoder
from flamingo.xattn import MediaKV, media_index_from_ids


@dataclass
class FlamingoOutput(ModelOutput):
    """What :meth:`Flamingo.forward` returns (a Hugging Face ModelOutput, so that engines that
    hook module outputs, like ZeRO-3, find its tensors)."""

    logits: torch.Tensor | None = None
    """(B, T, vocab_size), float32."""
    cache: Any = None
    """The LM's KV cache (a ``transformers.Cache``) when ``use_cache=True``."""
    media_latents: torch.Tensor | None = None
    """(B, N, R, Dv): the resampled media, reusable across calls (e.g. while decoding)."""
    nll_sum: torch.Tensor | None = None
    """With ``labels``: the summed next-token NLL over the targets (float32 scalar), computed
    with the head fused into the loss; ``logits`` is then None."""


def _check_slots(media_slots: torch.Tensor, num_media: int, sync_free: bool) -> None:
    if media_slots.ndim != 2 or media_slots.dtype != torch.long:
        raise ValueError(
            f"media_slots must be (B, N) int64, got {tuple(media_slots.shape)} {media_slots.dtype}"
        )
    if not media_slots.numel():
        return
    if sync_free:  # the device checks it when it gets there; the host does not wait
        torch._assert_async((media_slots >= -1).all() & (media_slots < num_media).all())
    elif not -1 <= int(media_slots.min()) <= int(media_slots.max()) < num_media:
        raise ValueError(
            f"media_slots must index the {num_media} media item(s) of pixel_values, or be -1; "
            f"got values from {int(media_slots.min())} to {int(media_slots.max())}"
        )


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Give a storage-free model (:func:`flamingo.formats.building`) its weights: each tensor, in its
    parameter's dtype, becomes the parameter."""
    params = dict(model.named_parameters())
    model.load_state_dict(
        {n: t.to(params[n].dtype) for n, t in tensors.items()}, strict=False, assign=True
    )
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if empty:
        raise ValueError(f"the checkpoint left {empty[:5]} without values")


class Flamingo(nn.Module):
    """Frozen vision tower + a connector + an LM that reads the media through a fusion
    (:mod:`flamingo.parts`): the Perceiver Resampler and gated cross-attention in the frozen LM
    (``connector: flamingo``), or LLaVA's projector or BLIP-2's Q-Former, whose tokens take the
    place of the ``<image>`` tokens (``connector: llava``, ``qformer``)."""

    def __init__(self, cfg: FlamingoConfig, vision: VisionEncoder, lm: FlamingoLM) -> None:
        super().__init__()
        self.cfg = cfg
        self.parts: Parts = parts_of(cfg)
        self.fusion = lm.fusion if lm.fusion is not None else self.parts.fusion
        self.vision = vision
        connector = self.parts.connector  # held under its name: its state-dict prefix
        lm_width = lm.hf.config.hidden_size
        self.add_module(connector.name, connector.build(vision.width, vision.num_tokens, lm_width))
        self.lm = lm
        if cfg.lm.trainable == "full":  # LLaVA's stage 2
            lm.hf.requires_grad_(True)
        elif cfg.lm.trainable == "lora":  # LLaVA's stage 2, the LM frozen, adapters in it
            add_adapters(lm.hf, cfg.lm.lora)
        self.policy = DEFAULT_POLICY

    def connector(self) -> nn.Module:
        """The module from the tower's tokens to what the LM reads."""
        return getattr(self, self.parts.connector.name)

    @classmethod
    def from_config(
        cls, cfg: FlamingoConfig, processor: FlamingoProcessor | None = None
    ) -> Flamingo:
        """Build the model: frozen parts from their sources, trainable parts freshly initialised.
        The new token rows follow the processor's special tokens (by default the processor of
        ``cfg``; pass the one you already have to load the tokenizer once)."""
        if processor is None:
            processor = FlamingoProcessor.from_config(cfg)
        parts = parts_of(cfg)
        dtype = torch_dtype(cfg.frozen_dtype)
        vision = parts.tower.build().to(dtype)
        hf_model = build_causal_lm(cfg.lm, dtype)
        special, size = processor.special_tokens, len(processor.tokenizer)
        dim_media = parts.connector.width(vision.width, hf_model.config.hidden_size)
        lm = FlamingoLM(hf_model, special, size, parts.fusion, dim_media)
        return cls(cfg, vision, lm)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        revision: str | None = None,
        changes: dict[str, Any] | None = None,
    ) -> Flamingo:
        """Rebuild a model from a checkpoint written by :meth:`save_pretrained`: frozen parts
        from their sources, the rest from the checkpoint, loaded strictly. ``directory`` is a
        local directory or a Hub repo id (at ``revision``; :mod:`flamingo.hub`): a repo in our
        format, or an OpenFlamingo v2 release or an IDEFICS or LLaVA repo, converted on first
        use and kept converted (an IDEFICS or LLaVA directory is converted in memory, each
        time).
        ``dtype``/``device`` cast and move it all; ``changes`` (dotted config fields; for a
        foreign format, a local directory) apply before it is built, e.g. the engine's
        ``frozen_dtype`` for an LM built partitioned."""
        kind = formats.kind_of(directory, revision)
        if kind is not None:  # converted in memory (a directory) or once into the cache (an id)
            found = formats.converted(kind, directory, revision, cls.from_config, changes)
            if isinstance(found, nn.Module):
                return found.to(device=device, dtype=torch_dtype(dtype)).eval()
            directory = found
        directory = hub.snapshot(directory, revision)
        cfg, meta = read_checkpoint_config(directory)
        cfg = cfg.replace({"lm.tokenizer": str(directory), **(changes or {})})  # its tokenizer
        # every weight in the checkpoint's files (a converted IDEFICS, a random tiny model):
        # built without storage and given them, not initialised and then overwritten; not
        # for an LM that ties its embeddings (built without storage, the tie is lost)
        with formats.building(cfg) as all_in_files:
            model = cls.from_config(cfg, FlamingoProcessor.from_pretrained(directory))
        saved = meta.get("special_tokens", {})
        if saved and list(saved.get("new_ids", [])) != list(model.special_tokens.new_ids):
            raise ValueError(
                f"{directory}: the tokenizer gives new-token ids "
                f"{list(model.special_tokens.new_ids)} but the weights were saved for "
                f"{saved.get('new_ids')}"
            )
        tensors = load_tensors(directory / TRAINABLE_NAME, model.trainable_state_dict())
        frozen_expected = model.frozen_state_dict()
        if frozen_expected:
            tensors.update(load_tensors(directory / FROZEN_NAME, frozen_expected))
        if all_in_files:
            _assign(model, tensors)
        else:
            _, unexpected = model.load_state_dict(tensors, strict=False)
            assert not unexpected, unexpected  # keys were checked above
        return model.to(device=device, dtype=torch_dtype(dtype)).eval()

    @classmethod
    def from_openflamingo(cls, checkpoint, cfg: FlamingoConfig) -> Flamingo:
        """Our model built from ``cfg`` (which must reproduce OpenFlamingo's numerics) with an
        OpenFlamingo ``checkpoint.pt`` (or its state dict) loaded into it
        (:mod:`flamingo.convert.openflamingo`)."""
        return formats.convert("openflamingo", checkpoint, cls.from_config, cfg)

    @classmethod
    def from_foreign(cls, kind: str, directory: str | Path) -> Flamingo:
        """Our model with a checkpoint directory of a registered foreign format
        (:mod:`flamingo.formats`: ``idefics``, ``llava``, ``blip-2``) converted into it, its
        config read from the checkpoint's own files. ``from_pretrained`` does this for any
        directory or Hub id in one of them."""
        return formats.convert(kind, directory, cls.from_config)

    def save_pretrained(
        self,
        directory: str | Path,
        processor: FlamingoProcessor | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write config, weights (:meth:`exported_names`) and tokenizer to ``directory``.

        ``tensors`` replaces the module's values by name: a sharded engine (ZeRO-3) gathers the
        full weights of :meth:`exported_names` and passes them here.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        trainable, frozen = self.trainable_state_dict(), self.frozen_state_dict()
        if tensors is not None:
            missing = sorted((set(trainable) | set(frozen)) - set(tensors))
            if missing:
                raise ValueError(f"tensors lacks {missing[:10]}")
            trainable = {n: tensors[n] for n in trainable}
            frozen = {n: tensors[n] for n in frozen}
        save_tensors(trainable, directory / TRAINABLE_NAME)
        if frozen:
            save_tensors(frozen, directory / FROZEN_NAME)
        elif (directory / FROZEN_NAME).exists():
            (directory / FROZEN_NAME).unlink()
        (processor or FlamingoProcessor.from_config(self.cfg)).save_pretrained(directory)
        # config.json last: its presence marks a complete checkpoint.
        special = {"new_ids": list(self.special_tokens.new_ids)}
        write_checkpoint_config(directory, self.cfg, {"special_tokens": special})
        return directory

    # -- what a checkpoint carries ----------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors: resampler, gated blocks, new token rows (or the projector, and
        the LM when it trains)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def frozen_state_dict(self) -> dict[str, torch.Tensor]:
        """Frozen tensors a checkpoint must carry because no source can rebuild them: a
        randomly initialised tower or LM, or an input embedding the training changed."""
        cfg = self.cfg
        prefixes = []
        if cfg.vision.pretrained is None:
            prefixes.append("vision.")
        if cfg.lm.architecture is not None:
            prefixes.append("lm.hf.")
        names = []
        if cfg.lm.save_input_embeddings and cfg.lm.architecture is None:
            embed = self.lm.hf.get_input_embeddings().weight
            names = [f"lm.hf.{n}" for n, p in self.lm.hf.named_parameters() if p is embed]
        params = {
            n: p for n, p in self.named_parameters(remove_duplicate=True) if not p.requires_grad
        }
        return {
            n: p.detach() for n, p in params.items() if n.startswith(tuple(prefixes)) or n in names
        }

    def gate_names(self) -> list[str]:
        """The gated blocks' gate parameters, block by block (their |tanh| is logged)."""
        return [
            f"lm.gated_blocks.{i}.{gate}"
            for i, block in enumerate(self.lm.gated_blocks)
            for gate in ("attn_gate", "ff_gate")
            if hasattr(block, gate)  # none with xattn.gating: none
        ]

    def exported_names(self) -> list[str]:
        """Every tensor name :meth:`save_pretrained` writes (trainable, then frozen)."""
        return list(self.trainable_state_dict()) + list(self.frozen_state_dict())

    # -- generation -------------------------------------------------------------------------------

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Continue prompts; see :func:`flamingo.generation.generate` for the arguments."""
        return generate(self, input_ids, **kwargs)

    def score(
        self, input_ids: torch.Tensor, candidates: list[torch.Tensor], **kwargs: Any
    ) -> torch.Tensor:
        """Log-likelihoods of continuations; see :func:`flamingo.generation.score`."""
        return score(self, input_ids, candidates, **kwargs)

    @property
    def special_tokens(self) -> SpecialTokens:
        return self.lm.special_tokens

    # -- media ------------------------------------------------------------------------------------

    def media_index(
        self, input_ids: torch.Tensor, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """phi (B, T): the media item each token sees, -1 for none
        (:func:`flamingo.xattn.media_index_from_ids`, with ``xattn.reset_after_eos``)."""
        special = self.special_tokens
        reset = special.eos_id if self.cfg.xattn.reset_after_eos else None
        if self.cfg.xattn.reset_after_eos and reset is None:
            raise ValueError("xattn.reset_after_eos needs a tokenizer with an eos token")
        return media_index_from_ids(input_ids, special.image_id, document_ids, reset)

    def encode_media(
        self,
        pixel_values: torch.Tensor,
        media_slots: torch.Tensor | None = None,
        aspect_ratio_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Media -> media_latents (B, N, R, D): the resampler's R latents of the tower's width
        (Flamingo), or the projector's tokens of the LM's width, one per tower token (LLaVA).
        The media come in one of two layouts:

        - flat (what :class:`FlamingoProcessor` and the training loader give):
          ``pixel_values (M, F, C, H, W)``, the batch's real media only, with ``media_slots
          (B, N)``, the index in that list of each sequence's n-th media item (-1: none). The
          tower and the resampler run on the M real items; empty slots get zero latents.
        - padded: ``pixel_values (B, N, F, C, H, W)``, every slot encoded, empty ones too.

        Both give the same logits: no token attends to an empty slot. A tiled tower's pixels
        (``vision.kind: mllama``: F is the tiles) come with ``aspect_ratio_ids``, (M,) or (B, N)
        as the pixels are laid out (0: an empty slot)."""
        extra = {}
        if aspect_ratio_ids is not None:
            if not hasattr(self.vision, "token_mask"):
                raise ValueError(
                    f"aspect_ratio_ids go with a tiled tower; vision.kind: {self.cfg.vision.kind} "
                    "takes none"
                )
            if aspect_ratio_ids.shape != pixel_values.shape[: pixel_values.ndim - 4]:
                raise ValueError(
                    f"aspect_ratio_ids {tuple(aspect_ratio_ids.shape)} must give one id per "
                    f"media item of pixel_values {tuple(pixel_values.shape)}"
                )
            extra["aspect_ratio_ids"] = aspect_ratio_ids
        if pixel_values.ndim == 6:
            if media_slots is not None:
                raise ValueError(
                    "media_slots go with flat pixel_values (M, F, C, H, W), not padded "
                    f"(B, N, F, C, H, W) ones; got pixel_values {tuple(pixel_values.shape)}"
                )
            return self.connector()(self.vision(pixel_values, **extra))
        if pixel_values.ndim != 5:
            raise ValueError(
                "pixel_values must be flat (M, F, C, H, W) with media_slots, or padded "
                f"(B, N, F, C, H, W); got shape {tuple(pixel_values.shape)}"
            )
        if media_slots is None:
            raise ValueError(
                "flat pixel_values (M, F, C, H, W) need media_slots (B, N): the index of each "
                "sequence's n-th media item in them, -1 for none (FlamingoProcessor gives both)"
            )
        _check_slots(media_slots, pixel_values.shape[0], self.policy.sync_free)
        extra = {k: v.unsqueeze(0) for k, v in extra.items()}
        latents = self.connector()(self.vision(pixel_values.unsqueeze(0), **extra)).squeeze(0)
        return place_in_slots(latents, media_slots)

    def media_mask(
        self, aspect_ratio_ids: torch.Tensor, media_slots: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, N, R) bool: the media tokens of a tiled tower's real tiles, from the ids of the
        flat (M,) layout with ``media_slots``, or of the padded (B, N) one."""
        mask = self.vision.token_mask(aspect_ratio_ids)
        return mask if media_slots is None else place_in_slots(mask, media_slots)

    # -- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        media_latents: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool = False,
        media_index: torch.Tensor | None = None,
        media_slots: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        media_kv: list[MediaKV] | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        document_ids: torch.Tensor | None = None,
        across_documents: bool = False,
        aspect_ratio_ids: torch.Tensor | None = None,
        media_mask: torch.Tensor | None = None,
    ) -> FlamingoOutput:
        """Logits for ``input_ids`` (B, T) conditioned on the media.

        Give the media as pixel values (flat ``pixel_values (M, F, C, H, W)`` with
        ``media_slots (B, N)``, or padded ``(B, N, F, C, H, W)``: :meth:`encode_media`), as
        already resampled
        ``media_latents (B, N, R, Dv)``, or as the gated blocks' precomputed keys/values
        (``media_kv``, see :meth:`FlamingoLM.media_kv`); none of them for text only.
        ``media_index (B, T)`` (phi) is derived from the ``<image>`` tokens of ``input_ids``
        unless given; it must be given when continuing from a ``cache`` (``out.cache`` of a call
        with ``use_cache=True``), since the new tokens alone cannot tell which image came last.
        ``attention_mask`` covers the cached tokens too, as in Hugging Face.

        With ``labels (B, T)`` (``flamingo.losses.make_labels``; -100 where no loss is taken)
        the output holds ``nll_sum``, the summed next-token NLL over the targets, instead of
        logits: the LM head is fused with the loss a few hundred rows at a time, so the
        ``(B, T, vocab)`` logits are never built (same value and gradients as
        ``flamingo.losses.summed_nll(logits, labels)``). Weighting and normalisation stay the
        caller's (``flamingo.losses.weighted_loss``). ``logits_to_keep=n`` computes the logits
        of the last n positions only (decoding needs the last one); 0 keeps all.

        Packed rows (several documents per row, :mod:`flamingo.packing`) come with
        ``document_ids (B, T)``: no token sees another document's images, positions restart
        per document, and self-attention is block-diagonal (each document gets the logits it
        has alone) unless ``across_documents`` (plain causal over the row, as IDEFICS
        trained). Labels for them: ``make_labels(..., document_ids=...)``. Training only: not
        with a cache.

        A tiled tower (``vision.kind: mllama``) takes ``aspect_ratio_ids`` with its pixels (the
        processor gives them), from which the real tiles' tokens are known; with media given
        otherwise, ``media_mask (B, N, R)`` says which tokens are real (None: all).
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        given = [
            n
            for n, v in (
                ("pixel_values", pixel_values),
                ("media_latents", media_latents),
                ("media_kv", media_kv),
            )
            if v is not None
        ]
        if len(given) > 1:
            raise ValueError(f"give one of pixel_values, media_latents, media_kv, not both {given}")
        if pixel_values is not None:
            media_latents = self.encode_media(pixel_values, media_slots, aspect_ratio_ids)
            if aspect_ratio_ids is not None and media_mask is None:
                media_mask = self.media_mask(aspect_ratio_ids, media_slots)
        elif media_slots is not None or aspect_ratio_ids is not None:
            raise ValueError("media_slots or aspect_ratio_ids were given without pixel_values")
        if document_ids is not None:
            self._check_packed(input_ids, document_ids, cache, use_cache)
        if media_index is None:
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError(
                    "media_index is required with a non-empty cache: pass the media "
                    "index of the new tokens computed over the whole sequence"
                )
            media_index = self.media_index(input_ids, document_ids)
        call = LMCall(
            input_ids,
            attention_mask,
            media_latents,
            media_kv,
            media_index,
            cache,
            document_ids,
            media_mask,
        )
        call = self.fusion.lm_inputs(self, call)  # checked against the text; how the LM reads them
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        result, new_cache = self.lm(
            input_ids,
            attention_mask,
            call.context,
            call.edit_embeds,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            labels=labels,
            logits_to_keep=logits_to_keep,
            document_ids=document_ids,
            across_documents=across_documents,
        )
        if labels is not None:
            return FlamingoOutput(cache=new_cache, media_latents=media_latents, nll_sum=result)
        return FlamingoOutput(logits=result, cache=new_cache, media_latents=media_latents)

    def _check_packed(
        self, input_ids: torch.Tensor, document_ids: torch.Tensor, cache: Any, use_cache: bool
    ) -> None:
        if document_ids.shape != input_ids.shape:
            raise ValueError(
                f"document_ids shape {tuple(document_ids.shape)} != input_ids shape "
                f"{tuple(input_ids.shape)}"
            )
        if cache is not None or use_cache:
            raise ValueError("document_ids (packed rows) are for training: not with a cache")

    # -- training support -------------------------------------------------------------------------

    def set_execution_policy(self, policy: ExecutionPolicy) -> None:
        """How the trainable modules run, as the training engine needs
        (:class:`flamingo.layers.ExecutionPolicy`); the engine calls this once."""
        set_policy(self, policy)
        self.lm.set_execution_policy(policy)

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The parts that train: the connector, the fusion's modules in the LM (the gated
        blocks) and the new token rows (paper Sec. 2), and the LM itself with ``lm.trainable:
        full`` (its adapters with ``lora``); everything else is frozen."""
        parts: dict[str, nn.Module] = {self.parts.connector.name: self.connector()}
        parts.update(self.fusion.trainable(self.lm))
        if self.cfg.lm.trainable == "full":
            parts["lm"] = self.lm.hf
        elif self.cfg.lm.trainable == "lora":
            parts["lora"] = adapter_modules(self.lm.hf)
        parts["new_tokens"] = self.lm.new_tokens
        return parts

    def set_lm_trainable(self, trainable: str) -> None:
        """Train the LM's own weights (``full``), adapters in it (``lora``) or neither
        (``none``): LLaVA's stage 2 starts from stage 1's checkpoint with the LM unfrozen or
        adapted (``lm.trainable``)."""
        before = self.cfg.lm.trainable
        if before == "lora" and trainable != "lora":
            raise ValueError(
                "this model's LM has LoRA adapters (lm.trainable: lora): they stay; train on "
                "with lm.trainable: lora"
            )
        self.cfg = self.cfg.replace({"lm.trainable": trainable})  # validated: presets that may
        if trainable == "lora":
            if before != "lora":
                add_adapters(self.lm.hf, self.cfg.lm.lora)
            return
        self.lm.hf.requires_grad_(trainable == "full")

    def decayed_modules(self) -> list[nn.Module]:
        """The trainable modules whose matrices take weight decay: the fusion's (the gated
        blocks), the connector where it says so (the paper: none on the resampler; LLaVA's
        projector, BLIP-2's Q-Former), a trained LM or its adapters; never the new rows."""
        skip = {"new_tokens"} | (
            set() if self.parts.connector.decays else {self.parts.connector.name}
        )
        return [m for name, m in self.trainable_modules().items() if name not in skip]

    def num_parameters(self, trainable_only: bool = False) -> int:
        params = self.parameters()
        return sum(p.numel() for p in params if p.requires_grad or not trainable_only)

    def external_parameters(self) -> list[tuple[nn.Module, list[nn.Parameter]]]:
        """Parameters read by a module other than their owner (sharding engines must know):
        the LM adapter uses the new token rows directly, and the output matrix when the head
        is fused with the loss (``labels``)."""
        head = self.lm.hf.get_output_embeddings().weight
        return [(self.lm, [*self.lm.new_tokens.parameters(), head])]

    def wrap_unit_classes(self) -> tuple[type[nn.Module], ...]:
        """Module classes a distributed engine may shard or checkpoint as units."""
        units = (*self.fusion.wrap_units(), *self.parts.connector.wrap_units())
        return (self.lm.decoder_layer_class(), *units)

    def compile_blocks(self, **options: Any) -> int:
        """Compile every repeated block on its own with ``torch.compile(**options)``
        (regional compilation: the decoder layers, gated blocks, perceiver layers and the
        tower's transformer blocks; each class traces once and its instances share the graph,
        torch inlining nn modules, as it does by default from 2.5).
        A block's ``forward`` is compiled, not its call, so the hooks that run the gated blocks
        before their decoder layers stay outside the graphs. Needs the execution policy's
        ``rebuild_activations`` off (its saved-tensor hooks read storage addresses, which
        compilation cannot trace; the compiler fuses those elementwise ops anyway). Returns
        the number of blocks compiled."""
        policies = [getattr(m, "policy", None) for m in self.modules()]
        policies = [p for p in policies if isinstance(p, ExecutionPolicy)]
        if any(policy.rebuild_activations for policy in policies):
            raise ValueError(
                "compile_blocks needs ExecutionPolicy(rebuild_activations=False): set it with "
                "set_execution_policy first (the engine does, with engine.compile: true)"
            )
        if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 5):
            raise RuntimeError(
                "compile_blocks needs torch >= 2.5 (nn modules inlined, so that the instances of "
                f"a block share one graph); this is torch {torch.__version__}"
            )
        return compile_each(self, (*self.wrap_unit_classes(), self.vision.block_class()), **options)
