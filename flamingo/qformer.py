"""BLIP-2's connector: the Q-Former's learned queries read the tower's tokens, and a linear
projection puts them into the LM's input (Li et al. 2023, Sec. 3).

A BERT-style transformer over ``queries`` learned query tokens (32 in BLIP-2): every layer
lets them attend to each other; every ``cross_attention_every``-th layer (from the first) also
to the frozen tower's tokens (all of them, CLS included, after the tower's final LayerNorm);
each sub-layer is post-norm (BERT's: ``LayerNorm(x + f(x))``). The queries' outputs, projected
to the LM's width, take the place of an image's ``<image>`` tokens (``queries`` of them), as
LLaVA's projected patches do (``FlamingoLM.splice``): a soft visual prompt of a fixed length.

Shapes: ``vision_tokens (B, N, F, V, Dv) -> media_latents (B, N, Q, D)`` (one frame per image).
The attribute names are transformers' ``Blip2QFormerModel``'s (``encoder.layer.{i}.attention.
attention.query``, ``crossattention``, ``intermediate_query``, ``output_query``, ...) and its
``query_tokens`` and ``language_projection``, so ``Salesforce/blip2-*`` checkpoints load by name
(``flamingo/convert/blip2.py``).

The text side, which only BLIP-2's stage 1 uses (``flamingo/qformer_pretraining.py``), is built
when a text vocabulary is given: BERT's word and position embeddings (``embeddings``), and in
every layer a feed-forward of its own for the text tokens (``intermediate``/``output``); the
text shares each layer's self-attention with the queries, under a mask that says who sees whom,
and never reads the tower (only the queries cross-attend). The queries and the text, joined,
pass through the same LayerNorm (``layernorm``) first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flamingo.config import QFormerConfig

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class MultiHeadAttention(nn.Module):
    """Queries from ``hidden``; keys and values from ``context`` (width ``dim_context``)."""

    def __init__(self, cfg: QFormerConfig, dim_context: int) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.query = nn.Linear(cfg.width, cfg.width)
        self.key = nn.Linear(dim_context, cfg.width)
        self.value = nn.Linear(dim_context, cfg.width)
        self.dropout = cfg.attention_dropout

    def forward(
        self, hidden: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``mask``: True where a row may attend to a column, broadcastable to (B, L, L)."""

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, L, d)

        q, k, v = split(self.query(hidden)), split(self.key(context)), split(self.value(context))
        p = self.dropout if self.training else 0.0
        mask = None if mask is None else mask.unsqueeze(1)  # every head
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return out.transpose(1, 2).flatten(-2)


class Residual(nn.Module):
    """BERT's output sub-layer: ``LayerNorm(x + dropout(dense(h)))``."""

    def __init__(self, cfg: QFormerConfig, dim_in: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim_in, cfg.width)
        self.LayerNorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)  # noqa: N815 (BERT's name)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(x + self.dropout(self.dense(h)))


class Attention(nn.Module):
    """An attention sub-layer and its residual output."""

    def __init__(self, cfg: QFormerConfig, dim_context: int) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(cfg, dim_context)
        self.output = Residual(cfg, cfg.width)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.output(self.attention(x, x if context is None else context, mask), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.width, cfg.intermediate)
        self.act = ACTIVATIONS[cfg.activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class QFormerLayer(nn.Module):
    """Self-attention over the queries and the text (if any), the queries' cross-attention to
    the tower's tokens (in every ``cross_attention_every``-th layer), then a feed-forward for
    the queries and another for the text."""

    def __init__(self, cfg: QFormerConfig, index: int, dim_vision: int, text: bool) -> None:
        super().__init__()
        self.attention = Attention(cfg, cfg.width)
        if index % cfg.cross_attention_every == 0:
            self.crossattention = Attention(cfg, dim_vision)
        if text:
            self.intermediate = Intermediate(cfg)
            self.output = Residual(cfg, cfg.intermediate)
        self.intermediate_query = Intermediate(cfg)
        self.output_query = Residual(cfg, cfg.intermediate)

    def forward(
        self,
        x: torch.Tensor,
        vision: torch.Tensor | None,
        queries: int,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x (B, queries + T, W)``: the queries first, then the text."""
        x = self.attention(x, mask=mask)
        parts = []
        if queries:
            q = x[:, :queries]
            if hasattr(self, "crossattention"):
                q = self.crossattention(q, vision)
            parts.append(self.output_query(self.intermediate_query(q), q))
        if x.shape[1] > queries:
            t = x[:, queries:]
            parts.append(self.output(self.intermediate(t), t))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class QFormerEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig, dim_vision: int, text: bool) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            QFormerLayer(cfg, i, dim_vision, text) for i in range(cfg.layers)
        )


class TextEmbeddings(nn.Module):
    """BERT's word and position embeddings (the sum; the LayerNorm is the Q-Former's)."""

    def __init__(self, cfg: QFormerConfig, vocab: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, cfg.width)
        self.position_embeddings = nn.Embedding(cfg.max_text_positions, cfg.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"text of {length} tokens is longer than the Q-Former's "
                f"qformer.max_text_positions={self.position_embeddings.num_embeddings}"
            )
        positions = torch.arange(length, device=ids.device)
        return self.word_embeddings(ids) + self.position_embeddings(positions)


class QFormer(nn.Module):
    """Learned queries -> the tower's tokens, read -> the LM's input width (``dim_lm``; None:
    no projection, stage 1). ``text_vocab``: build the text side with this vocabulary."""

    def __init__(
        self, cfg: QFormerConfig, dim_vision: int, dim_lm: int | None, text_vocab: int | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.queries, cfg.width) * 0.02)
        if text_vocab is not None:
            self.embeddings = TextEmbeddings(cfg, text_vocab)
        self.layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = QFormerEncoder(cfg, dim_vision, text=text_vocab is not None)
        if dim_lm is not None:
            self.language_projection = nn.Linear(cfg.width, dim_lm)

    def encode(
        self,
        vision: torch.Tensor | None,
        text_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last layer's outputs ``(M, Q + T, W)``: the queries (when ``vision (M, V, Dv)``
        is given: they read it) followed by the text (``text_ids (M, T)``, the text side's),
        under ``mask`` (True where a row may attend to a column, broadcastable to
        ``(M, Q + T, Q + T)``; None: everyone sees everyone)."""
        parts, queries = [], 0
        if vision is not None:
            queries = self.cfg.queries
            parts.append(self.query_tokens.expand(vision.shape[0], -1, -1))
            vision = vision.to(self.query_tokens.dtype)
        if text_ids is not None:
            parts.append(self.embeddings(text_ids).to(self.query_tokens.dtype))
        x = self.dropout(self.layernorm(torch.cat(parts, dim=1)))
        for layer in self.encoder.layer:
            x = layer(x, vision, queries, mask)
        return x

    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        if vision_tokens.ndim != 5:
            raise ValueError(
                f"vision_tokens must be (B, N, F, V, Dv), got shape {tuple(vision_tokens.shape)}"
            )
        b, n, f = vision_tokens.shape[:3]
        if f != 1:
            raise ValueError(
                f"connector: qformer takes single images, got media of {f} frames (video needs "
                "the resampler's time embeddings: connector: flamingo)"
            )
        x = self.encode(vision_tokens[:, :, 0].flatten(0, 1))  # (B N, Q, W)
        return self.language_projection(x).unflatten(0, (b, n))  # (B, N, Q, D)
