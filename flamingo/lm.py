"""Hugging Face causal-LM adapter: where the gated blocks go, and the new token rows.

* **Decoder-layer table.** ``DECODER_LAYOUTS`` maps an HF ``config.model_type`` to the dotted path
  of its decoder-layer list. An unknown type is an error that lists the supported ones; there is
  no guessing from module or model names.
* **Blocks before layers.** A fusion (``flamingo.parts``) may give the LM blocks to run
  *before* chosen decoder layers (Flamingo's GATED XATTN-DENSE blocks, paper Fig. 4), held as
  ``gated_blocks``. Each is attached as a forward pre-hook on its layer, so the HF model's code,
  classes and module tree stay untouched. What the blocks read in one call (the fusion's
  context: the media, phi, a shared mask) reaches the hooks through one scoped context that
  :meth:`FlamingoLM.forward` sets and always clears; a fusion may instead edit the input
  embeddings (the media spliced in place of ``<image>``). This module knows neither way: the
  fusion says what a block takes (``Fusion.block_inputs``).
* **Decoupled new tokens.** ``<image>``, ``<|endofchunk|>`` (and ``<PAD>``) get their own small
  trainable input and output rows beside the frozen embedding and output matrices: no
  ``resize_token_embeddings`` of frozen weights, the optimiser holds state for a few rows only,
  and the model can predict ``<|endofchunk|>``.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from flamingo.config import LanguageConfig
from flamingo.fused_nll import fused_summed_nll
from flamingo.layers import DEFAULT_POLICY, ExecutionPolicy, is_partitioned, set_policy, whole
from flamingo.mpt import use_sdpa_attention
from flamingo.packing import block_diagonal_mask, document_positions
from flamingo.tokens import SpecialTokens


@dataclass(frozen=True)
class DecoderLayout:
    """How to reach one LM family's decoder layers."""

    layers: str
    """Dotted path from the ``*ForCausalLM`` module to its ``ModuleList`` of decoder layers."""
    position_ids: bool = True
    """Whether the base model takes ``position_ids`` (left padding needs them); ALiBi models
    (MPT) have none and are padding-invariant by construction."""
    gated_mlp: bool = False
    """The MLP has gate, up and down projections (SwiGLU), three matrices instead of two (FLOP
    counts need it)."""
    packed_positions: bool = True
    """transformers reads a packed row's boundaries from its position ids (flash-attention
    kernels' variable-length path; tested on the CPU through its mask builder). OPT builds its
    mask without them, MPT has none: packed rows need a 4-D mask there (SDPA or eager)."""


DECODER_LAYOUTS: dict[str, DecoderLayout] = {
    "gpt2": DecoderLayout("transformer.h"),
    "gpt_neox": DecoderLayout("gpt_neox.layers"),
    "llama": DecoderLayout("model.layers", gated_mlp=True),
    "mistral": DecoderLayout("model.layers", gated_mlp=True),
    "mpt": DecoderLayout("transformer.blocks", position_ids=False, packed_positions=False),
    "opt": DecoderLayout("model.decoder.layers", packed_positions=False),
    "qwen2": DecoderLayout("model.layers", gated_mlp=True),
    "qwen3": DecoderLayout("model.layers", gated_mlp=True),
}


def decoder_layout(model_type: str) -> DecoderLayout:
    if model_type not in DECODER_LAYOUTS:
        raise ValueError(
            f"LM model_type {model_type!r} is not supported; supported types: "
            f"{sorted(DECODER_LAYOUTS)}. Add its decoder-layer path to "
            "flamingo.lm.DECODER_LAYOUTS (and a tiny-config test)."
        )
    return DECODER_LAYOUTS[model_type]


def cache_argument(module: nn.Module) -> str:
    """The name under which ``module.forward`` takes the KV cache in the installed transformers:
    ``cache`` from 5.24 on (where ``past_key_values`` is deprecated, its removal announced for
    5.40, and outputs carry a ``cache`` field instead), ``past_key_values`` before."""
    parameters = inspect.signature(module.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _disable_dropout(config: PretrainedConfig) -> None:
    """Zero every dropout probability of an HF config (frozen LM: deterministic forward)."""
    for key, value in config.to_dict().items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)


SDPA_PATCHES = {"mpt": use_sdpa_attention}
"""LM families whose transformers code has no SDPA attention, and the function that gives them
one on the loaded model (``attn_implementation: sdpa`` then means ours; eager stays theirs)."""


def build_causal_lm(cfg: LanguageConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load (or, with an inline architecture, randomly initialise) the HF causal LM."""
    if cfg.architecture is not None:
        arch = dict(cfg.architecture)
        config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    else:
        config = AutoConfig.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    decoder_layout(config.model_type)  # fail before loading weights
    if cfg.disable_dropout:
        _disable_dropout(config)
    patch = SDPA_PATCHES.get(config.model_type) if cfg.attn_implementation == "sdpa" else None
    config._attn_implementation = "eager" if patch else cfg.attn_implementation
    if cfg.architecture is not None:
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path,
            config=config,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            dtype=dtype,
        )
    if patch:
        patch(model)
    if cfg.head_rows is not None:
        keep_head_rows(model, cfg.head_rows)
    partitioned = {p.dtype for p in model.parameters() if is_partitioned(p)}
    if not partitioned:
        return model.to(dtype)
    # Built partitioned (ZeRO-3's zero.Init, engine.frozen_weights: partitioned): the parameters
    # hold no data here, and DeepSpeed chose their dtype from the engine's precision.
    if partitioned != {dtype}:
        raise ValueError(
            f"ZeRO-3 partitioned the LM's weights in {sorted(map(str, partitioned))} (the "
            f"engine's precision) but the model config's frozen_dtype is {dtype}: make them "
            "agree (engine.precision: bf16 stores the frozen weights in bfloat16)"
        )
    return model


def keep_head_rows(model: nn.Module, rows: int) -> None:
    """Give ``model`` an LM head of its first ``rows`` rows (``lm.head_rows``: Llama 3.2
    Vision's embedding has rows its head lacks). Untied heads only."""
    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight:
        raise ValueError("lm.head_rows needs an LM whose head is not tied to its embedding")
    if not 0 < rows <= head.out_features:
        raise ValueError(f"lm.head_rows={rows} but the LM head has {head.out_features} rows")
    kept = nn.Linear(head.in_features, rows, bias=False, device=head.weight.device)
    if is_partitioned(head.weight):  # built under zero.Init: whole here, partitioned by the engine
        with whole(head.weight):
            weight = head.weight[:rows].detach().clone()
    else:
        weight = head.weight[:rows].detach()
    kept.weight = nn.Parameter(weight, requires_grad=head.weight.requires_grad)
    model.set_output_embeddings(kept)


class NewTokenEmbeddings(nn.Module):
    """Trainable input (and output) rows for the tokens Flamingo adds to the vocabulary.

    Rows start at the mean of the frozen matrix's rows, so a new token's logit starts at an
    average value rather than at an arbitrary one. With a tied LM the output rows are the input
    rows, as they would be after resizing a tied embedding.
    """

    def __init__(
        self,
        token_ids: tuple[int, ...],
        input_matrix: torch.Tensor,
        output_matrix: torch.Tensor,
        tied: bool,
    ) -> None:
        super().__init__()
        self.register_buffer(
            "token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=False
        )
        k = len(token_ids)
        if k:
            rows = lambda m: nn.Parameter(m.float().mean(0, keepdim=True).repeat(k, 1))  # noqa: E731
            self.input_rows = rows(input_matrix)
            self.output_rows = None if tied else rows(output_matrix)
        else:  # the tokenizer brings every token (LLaVA's, Llama 3.2 Vision's): nothing trains
            # here, and no engine is given an empty parameter (ZeRO-3 cannot gather one)
            empty = torch.zeros(0, input_matrix.shape[1])  # real, whatever the build's device
            self.register_buffer("input_rows", empty, persistent=False)
            self.register_buffer("output_rows", None if tied else empty.clone(), persistent=False)

    def output_weight(self) -> torch.Tensor:
        return self.input_rows if self.output_rows is None else self.output_rows


class FlamingoLM(nn.Module):
    """A frozen HF causal LM with gated cross-attention blocks and decoupled new-token rows."""

    def __init__(
        self,
        hf_model: nn.Module,
        special_tokens: SpecialTokens,
        tokenizer_size: int,
        fusion: Any = None,
        dim_media: int = 0,
    ) -> None:
        """``fusion`` (``flamingo.parts.Fusion``) gives the blocks to run before chosen
        layers (``gated_blocks``; none for a fusion without) and what each takes in a call."""
        super().__init__()
        config = hf_model.config
        self.layout = decoder_layout(config.model_type)
        self.hf = hf_model.requires_grad_(False)
        self._cache_argument = cache_argument(hf_model.base_model)
        self.special_tokens = special_tokens
        self.policy = DEFAULT_POLICY

        embed = hf_model.get_input_embeddings()
        head = hf_model.get_output_embeddings()
        if not isinstance(head, nn.Linear) or head.bias is not None:
            raise ValueError(
                f"{config.model_type}: expected a bias-free nn.Linear LM head, got {head}"
            )
        self.base_vocab = head.out_features
        num_owned = len(special_tokens.new_ids)
        if tokenizer_size - num_owned > embed.num_embeddings:
            raise ValueError(
                f"the tokenizer has {tokenizer_size - num_owned} base tokens but the LM's "
                f"embedding has {embed.num_embeddings} rows: tokenizer and LM do not match"
            )
        tied = head.weight is embed.weight
        with whole(embed.weight, head.weight):
            self.new_tokens = NewTokenEmbeddings(
                special_tokens.new_ids, embed.weight, head.weight, tied
            )
        ids = list(special_tokens.new_ids)
        self.vocab_size = max(self.base_vocab, max(ids, default=-1) + 1)
        # Usual case (GPT-2, Llama): the new ids directly follow the LM's rows -> concatenate.
        self._append_new_logits = ids == list(range(self.base_vocab, self.base_vocab + len(ids)))

        layers = hf_model.get_submodule(self.layout.layers)
        self.fusion = fusion
        blocks, self.layer_indices = (
            fusion.blocks(config, len(layers), dim_media) if fusion else (nn.ModuleList(), [])
        )
        self.gated_blocks = blocks  # the name OpenFlamingo's checkpoints use
        for block_idx, layer_idx in enumerate(self.layer_indices):
            layers[layer_idx].register_forward_pre_hook(
                partial(self._run_block, block_idx), with_kwargs=True
            )
        self.tokenizer_size = tokenizer_size
        self._media: Any = None

    # -- the scoped context through which media reach the blocks ------------------------------

    @contextlib.contextmanager
    def media_context(self, context: Any) -> Iterator[None]:
        """Make the fusion's ``context`` visible to the blocks for the duration of one LM
        call."""
        if self._media is not None:
            raise RuntimeError("FlamingoLM.media_context is not re-entrant")
        with self._media_restored(context):
            yield

    def _run_block(
        self, block_idx: int, layer: nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]]:
        if self._media is None:
            raise RuntimeError(
                "a decoder layer with a gated cross-attention block ran outside "
                "FlamingoLM.forward; call the Flamingo model, not its inner HF LM"
            )
        hidden = args[0] if args else kwargs["hidden_states"]
        block = self.gated_blocks[block_idx]
        inputs = self.fusion.block_inputs(block_idx, block, self._media)
        dtype = next(block.parameters()).dtype
        if self.policy.checkpoints_gated_blocks() and self.training:
            out = checkpoint(block, hidden.to(dtype), *inputs, use_reentrant=False)
        else:
            out = block(hidden.to(dtype), *inputs)
        out = out.to(hidden.dtype)
        if args:
            return (out, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": out}

    # -- embeddings and logits --------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) -> inputs_embeds (B, T, E): frozen rows, new tokens from own rows."""
        if not self.new_tokens.token_ids.numel():  # the tokenizer brought every token: no rows
            return self.hf.get_input_embeddings()(input_ids)
        is_new = input_ids.unsqueeze(-1) == self.new_tokens.token_ids  # (B, T, k)
        base_ids = input_ids.masked_fill(is_new.any(-1), 0)
        embeds = self.hf.get_input_embeddings()(base_ids)
        rows = self.new_tokens.input_rows
        new = (is_new.to(rows.dtype) @ rows).to(embeds.dtype)
        return torch.where(is_new.any(-1, keepdim=True), new, embeds)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D) -> float32 logits (B, T, vocab_size)."""
        base = self.hf.get_output_embeddings()(hidden).float()
        weight = self.new_tokens.output_weight()
        new = F.linear(hidden.to(weight.dtype), weight).float()
        if self._append_new_logits:
            return torch.cat([base, new], dim=-1)
        if self.vocab_size > self.base_vocab:
            base = F.pad(base, (0, self.vocab_size - self.base_vocab))
        return base.index_copy(-1, self.new_tokens.token_ids, new)

    def summed_nll(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed next-token NLL of ``labels (B, T)`` (-100: no target) from the last hidden
        states ``(B, T, D)``, the head fused with the loss: the same value and gradients as
        ``flamingo.losses.summed_nll(self.logits(hidden), labels)`` without the logits."""
        return fused_summed_nll(
            hidden,
            labels,
            self.hf.get_output_embeddings().weight,
            self.new_tokens.output_weight(),
            self.new_tokens.token_ids,
            self.vocab_size,
            compact=not self.policy.sync_free,
        )

    # -- forward ------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        context: Any = None,
        edit_embeds: Callable[[torch.Tensor], torch.Tensor] | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool = False,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        document_ids: torch.Tensor | None = None,
        across_documents: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        """Returns ``(logits (B, T, vocab_size), cache)``; with ``labels``, ``(summed NLL,
        cache)`` instead, without computing the logits (:meth:`summed_nll`). ``cache`` is the
        HF model's own (a ``transformers.Cache``), None unless ``use_cache``. With
        ``document_ids`` (packed rows, :mod:`flamingo.packing`) self-attention stays inside
        each document and positions restart, unless ``across_documents``. The fusion's
        ``context`` is what the blocks read; ``edit_embeds`` changes the input embeddings
        (``flamingo.parts.LMCall``)."""
        if document_ids is not None and not across_documents:
            if position_ids is None and self.layout.position_ids:
                position_ids = document_positions(document_ids)
            attention_mask = self._packed_attention_mask(document_ids, attention_mask)
        kwargs: dict[str, Any] = {self._cache_argument: cache}
        if self.layout.position_ids:
            if position_ids is None and attention_mask is not None:
                # Left padding: count positions from each sequence's first real token. The mask
                # covers cached tokens too (HF convention), so keep the last T positions.
                positions = attention_mask.long().cumsum(-1) - 1
                position_ids = positions.clamp(min=0)[:, -input_ids.shape[1] :]
            kwargs["position_ids"] = position_ids
        embeds = self.embed(input_ids)
        if edit_embeds is not None:
            embeds = edit_embeds(embeds)
        with self.media_context(context):
            out = self.hf.base_model(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                use_cache=use_cache,
                **kwargs,
            )
        cache = getattr(out, self._cache_argument) if use_cache else None
        if labels is not None:
            return self.summed_nll(out.last_hidden_state, labels), cache
        hidden = out.last_hidden_state
        return self.logits(hidden[:, -logits_to_keep:] if logits_to_keep else hidden), cache

    def packed_boundaries(self) -> Literal["mask", "positions"]:
        """How this LM's attention is told where a packed row's documents end: ``mask``, a 4-D
        block-diagonal mask, which transformers hands to SDPA and eager attention unchanged;
        ``positions``, for flash-attention kernels: no mask, and transformers reads the
        boundaries from the restarting position ids (variable-length sequences)."""
        implementation = self.hf.config._attn_implementation
        if implementation in ("sdpa", "eager"):
            return "mask"
        if implementation.startswith("flash_attention") and self.layout.packed_positions:
            return "positions"
        raise ValueError(
            f"packed rows need lm.attn_implementation sdpa, eager or (for a family that reads "
            f"them from position ids) a flash-attention kernel; this {self.hf.config.model_type} "
            f"LM runs {implementation!r}: set lm.attn_implementation=sdpa, or packing: "
            "cross_document"
        )

    def _packed_attention_mask(
        self, document_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The mask a packed batch gives the LM: none where the position ids carry the
        boundaries; else the block-diagonal one in the form the attention takes, boolean for
        SDPA (True: attend), additive for eager (MPT casts that to its masked-is-True form)."""
        if self.packed_boundaries() == "positions":
            return None
        allowed = block_diagonal_mask(document_ids, attention_mask)
        dtype = self.hf.get_input_embeddings().weight.dtype
        module = vars(sys.modules[type(self.hf.base_model).__module__])
        if "_prepare_4d_causal_attention_mask" in module and "create_causal_mask" not in module:
            # a family still on transformers' older mask helper (MPT before transformers 5)
            # takes a 4-D mask as 1 (attend) and 0, and inverts it itself
            return allowed.to(dtype)
        if self.hf.config._attn_implementation == "sdpa":
            return allowed
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)

    def set_execution_policy(self, policy: ExecutionPolicy) -> None:
        """Take the engine's policy: with ``checkpoint_layers``, decoder layers (HF's mechanism)
        and gated blocks are recomputed in the backward, with ``checkpoint_gated_blocks`` the
        gated blocks only; checkpointed blocks rebuild nothing themselves (checkpointing
        manages their saved tensors)."""
        set_policy(self, policy)
        if policy.checkpoints_gated_blocks():
            set_policy(self.gated_blocks, replace(policy, rebuild_activations=False))
        enabled = policy.checkpoint_layers
        # transformers 5 renamed gradient_* to activation_checkpointing_*; 4.x has the old names.
        if hasattr(self.hf, "activation_checkpointing_enable"):
            enable, disable = (
                self.hf.activation_checkpointing_enable,
                self.hf.activation_checkpointing_disable,
            )
        else:
            enable, disable = (
                self.hf.gradient_checkpointing_enable,
                self.hf.gradient_checkpointing_disable,
            )
        if enabled:
            enable({"use_reentrant": False, "context_fn": self._recompute_contexts})
        else:
            disable()

    def _recompute_contexts(self) -> tuple[contextlib.AbstractContextManager, ...]:
        """``torch.utils.checkpoint``'s ``context_fn`` for the HF decoder layers: called when a
        layer is checkpointed in the forward, it returns the contexts of that forward and of its
        recomputation. transformers before 5.23 checkpoints a layer's ``__call__``, so the
        recomputation in the backward runs the layer's forward pre-hook, the gated block, again,
        after the media context of the forward has closed; it reopens with the media the
        forward saw (from 5.23 on the hooks stay outside the checkpoint and it goes unused)."""
        return contextlib.nullcontext(), self._media_restored(self._media)

    @contextlib.contextmanager
    def _media_restored(self, media: Any) -> Iterator[None]:
        """Set what the gated blocks see, and put back what was there on the way out."""
        previous, self._media = self._media, media
        try:
            yield
        finally:
            self._media = previous

    def decoder_layer_class(self) -> type[nn.Module]:
        return type(self.hf.get_submodule(self.layout.layers)[0])
