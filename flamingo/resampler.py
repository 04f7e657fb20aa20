"""Perceiver Resampler (Flamingo paper, Sec. 2.1 and Fig. 5).

Maps a variable number of vision tokens per media item (an image, or a video's frames) to a
fixed number R of latents. Learned latents cross-attend to ``concat(media tokens, latents)``;
each layer is pre-norm attention then a feed-forward, both residual; a final LayerNorm.

For video, a learned time embedding per frame is added to that frame's tokens before they are
flattened, so the latents can tell frames apart; single images (F == 1) get none.
With ``spatial_embeddings`` (off in the paper), a learned embedding per token position is added
too, so the latents can tell where in the image a token came from.

Shapes (ARCHITECTURE.md glossary): ``vision_tokens (B, N, F, V, Dv) -> media_latents (B, N, R, Dv)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from flamingo.config import ResamplerConfig
from flamingo.layers import DEFAULT_POLICY, FeedForward, layer_norm, rebuilt_in_backward


class PerceiverAttention(nn.Module):
    """Latents attend to the media tokens and to themselves.

    Under the default policy the normed inputs, which the query and key/value projections
    would keep, are rebuilt in the backward (:mod:`flamingo.layers`). The attribute names
    (``norm_media``, ``norm_latents``, ``to_q``, ``to_kv``, ``to_out``) are OpenFlamingo's: its
    checkpoints load by name (``flamingo/convert/openflamingo.py``).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, qk_norm: bool = False) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        # resampler.qk_norm: each head's queries and keys LayerNormed (IDEFICS)
        self.q_norm = nn.LayerNorm(dim_head) if qk_norm else None
        self.k_norm = nn.LayerNorm(dim_head) if qk_norm else None
        self.policy = DEFAULT_POLICY

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media (b, n, d), latents (b, r, d) -> (b, r, d)."""
        rebuild = self.policy.rebuilds_reading_parameters()

        def normed_latents() -> torch.Tensor:
            return layer_norm(self.norm_latents, latents)

        def kv_input() -> torch.Tensor:
            return torch.cat([layer_norm(self.norm_media, media), normed_latents()], dim=1)

        normed = self.norm_latents(latents)
        q = rebuilt_in_backward(self.to_q, normed, normed_latents, rebuild)
        both = torch.cat([self.norm_media(media), normed], dim=1)
        k, v = rebuilt_in_backward(self.to_kv, both, kv_input, rebuild).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h r d -> b r (h d)"))


class PerceiverLayer(nn.Module):
    """One resampler layer: residual attention, then residual feed-forward (a wrap unit)."""

    def __init__(self, cfg: ResamplerConfig, dim: int) -> None:
        super().__init__()
        self.attn = PerceiverAttention(dim, cfg.heads, cfg.dim_head, cfg.qk_norm)
        self.ff = FeedForward(dim, cfg.ff_mult, activation=cfg.ff_activation)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attn(media, latents)
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """(B, N, F, V, D) vision tokens -> (B, N, R, D) latents."""

    def __init__(self, cfg: ResamplerConfig, dim: int, num_tokens: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, dim))
        self.time_embeddings = (
            nn.Parameter(torch.randn(cfg.max_num_frames, dim)) if cfg.max_num_frames else None
        )
        self.spatial_embeddings = None
        if cfg.spatial_embeddings:
            if not num_tokens:
                raise ValueError(
                    "resampler.spatial_embeddings needs the number of vision tokens per frame"
                )
            # zero at init: the resampler starts as the paper's and learns how much to use them
            self.spatial_embeddings = nn.Parameter(torch.zeros(num_tokens, dim))
        self.layers = nn.ModuleList(PerceiverLayer(cfg, dim) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim)
        self.policy = DEFAULT_POLICY

    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        if vision_tokens.ndim != 5:
            raise ValueError(
                f"vision_tokens must be (B, N, F, V, D), got shape {tuple(vision_tokens.shape)}"
            )
        b, n, num_frames = vision_tokens.shape[:3]
        x = vision_tokens.to(self.latents.dtype)
        if self.spatial_embeddings is not None:
            if x.shape[3] != self.spatial_embeddings.shape[0]:
                raise ValueError(
                    f"got {x.shape[3]} vision tokens per frame; the spatial embeddings were "
                    f"built for {self.spatial_embeddings.shape[0]}"
                )
            x = x + self.spatial_embeddings
        if num_frames > 1:
            if self.time_embeddings is None:
                raise ValueError(
                    f"got {num_frames} frames per media item but resampler.max_num_frames is 0: "
                    "set resampler.max_num_frames >= the number of video frames"
                )
            if num_frames > self.cfg.max_num_frames:
                raise ValueError(
                    f"got {num_frames} frames per media item, more than "
                    f"resampler.max_num_frames={self.cfg.max_num_frames}: sample fewer frames "
                    "or raise max_num_frames"
                )
            x = x + rearrange(self.time_embeddings[:num_frames], "f d -> f 1 d")
        media = rearrange(x, "b n f v d -> (b n) (f v) d")
        latents = repeat(self.latents, "r d -> bn r d", bn=b * n)
        if (
            num_frames == 1
            and self.time_embeddings is not None
            and self.policy.every_parameter_takes_part
            and torch.is_grad_enabled()
        ):
            # Still images take no time embedding; it takes part times zero (same values), so
            # a micro-batch of images gives it a zero gradient, not none (the policy's reason).
            latents = latents + 0.0 * self.time_embeddings[0]
        for layer in self.layers:
            latents = layer(media, latents)
        return rearrange(self.norm(latents), "(b n) r d -> b n r d", b=b)
