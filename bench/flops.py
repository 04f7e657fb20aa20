"""Analytic FLOPs of one Flamingo training step, and model FLOPs utilisation (MFU).

Counted: matrix multiplications, 2 FLOPs per multiply-add; LayerNorms, activations, softmax,
the loss and the optimiser are left out (a few percent). The tower's, the LM's and the head's
terms are here; the connector's and the fusion's are their own (``Connector.flops``,
``Fusion.flops`` in ``flamingo/parts``), the formulas below. With F a part's forward FLOPs:

* frozen vision tower, run without gradients: **F**. Per frame (an image is one frame; a
  video item has F of them), the patch embedding
  ``2 P (3 p^2) W`` and per layer ``2 S (4 W^2 + 2 W M) + 4 S^2 W`` (QKV and output
  projections, MLP, attention scores and their weighted sum over ``S = P + 1`` tokens);
* trainable resampler and gated cross-attention blocks: **3F** (input and weight gradients).
  Resampler, per media item and layer: keys and values over the ``V + R`` media tokens (the
  item's frames' patches together: ``V = F P``) and latents ``2 (V+R) W 2I``, queries
  ``2 R W I``, attention ``4 R (V+R) I``, output ``2 R I W``,
  feed-forward ``4 R W (m W)``. Gated block, per sequence: queries ``2 T D I``, media keys and
  values ``2 (N R) Dv 2I``, attention over every media latent ``4 T (N R) I`` (the mask
  removes none of the work), output ``2 T I D``, feed-forward ``4 T D (m D)``;
* frozen LM, gradients flowing through to the gated blocks and the embeddings: its
  projections and MLP, per layer ``2 T (2 D^2 + 2 D D_kv + k D F_ff)``, **2F** (input gradients
  only), with ``D_kv`` the keys' and values' width (``D`` without grouped-query attention) and
  ``k`` the MLP's matrices (2; 3 for a gated, SwiGLU MLP: Llama, Mistral, Qwen); the backward
  runs through every layer, the new tokens' input rows being trainable;
  its attention, per layer ``4 T^2 D``, **3F** (queries, keys and values all need gradients):
  the full ``T x T`` score matrix, as the Megatron/PaLM convention counts it (causal kernels
  skip about half);
* the LM head: **2F** with ``F = 2 T D V``, every position (model FLOPs: what the model
  needs, the same figure for any implementation; ours computes target rows only).

The LLaVA connector (``connector: llava``) has no resampler and no gated blocks; its tower runs
to ``vision.feature_layer`` (the blocks counted are those run), its projector is ``2 V W D``
per image over its ``V`` tokens, **2F** (its input, the frozen tower's, needs no gradient),
plus ``2 V D D`` for the second layer, **3F**, and ``T`` counts the image tokens the LM reads. With the LM trained (``lm.trainable:
full``, LLaVA's stage 2) the LM, its attention and the head are **3F** (weight gradients too).
The Q-Former connector (``connector: qformer``), per image over ``Q`` queries of width ``H``
and the tower's ``V`` tokens: per layer self-attention ``8 Q H^2 + 4 Q^2 H`` and feed-forward
``4 Q H I``, in its cross-attention layers queries and output ``4 Q H^2``, attention
``4 Q V H``, all **3F**, and keys and values of the tower's tokens ``4 V W H``, **2F** (their
input needs no gradient); the projection into the LM ``2 Q H D``, **3F**. LoRA's adapters are
not counted. The ``k`` new token rows, when given (``new_tokens``), add
their head columns, **3F**, and their embedding's one-hot product, **2F** (``2 T D k``
each).

MFU is these model FLOPs per second over the device's dense peak (:data:`PEAK_TFLOPS`); on a
CPU, over the fp32 rate of a large matrix product measured on the same threads
(:func:`matmul_peak_tflops`). The benchmarks also report the conventional figure,
``6 N tokens`` (:func:`conventional_flops`: every parameter trained, every token through the
whole model), which overstates this step's work: its frozen tower and LM need no weight
gradients. Since some model FLOPs are skipped (the head's non-target rows, the
causal half of the LM's attention), an implementation can exceed 100% of that measured peak.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from flamingo.config import FlamingoConfig, VisionConfig
from flamingo.parts import parts_of

PEAK_TFLOPS = {  # dense peaks by device name and precision (vendor datasheets; dense = half
    # the with-sparsity tensor-core figure). SXM parts carry the bare name.
    ("H100 PCIe", "bf16"): 756.0,
    ("H100 NVL", "bf16"): 835.0,
    ("H100", "bf16"): 989.0,
    ("H200 NVL", "bf16"): 835.0,
    ("H200", "bf16"): 989.0,
    ("A100", "bf16"): 312.0,
    ("H100 PCIe", "fp32"): 51.0,
    ("H100 NVL", "fp32"): 60.0,
    ("H100", "fp32"): 67.0,
    ("H200 NVL", "fp32"): 60.0,
    ("H200", "fp32"): 67.0,
    ("A100", "fp32"): 19.5,
}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The device's dense peak for ``precision``, by the longest table name found in
    ``device_name`` ("NVIDIA H100 NVL" is an NVL, not an SXM part); None if unknown."""
    matches = [
        (len(name), tflops)
        for (name, prec), tflops in PEAK_TFLOPS.items()
        if name in device_name and prec == precision
    ]
    return max(matches)[1] if matches else None


def matmul_peak_tflops(n: int = 2048, repeats: int = 5) -> float:
    """The best fp32 rate (TFLOP/s) of an ``n x n x n`` matrix product on the CPU with the
    current threads: the peak MFU is taken against where no datasheet figure applies."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = math.inf
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


@dataclass(frozen=True)
class StepShape:
    """What the FLOPs of a step depend on (the glossary's names)."""

    batch: int
    seq_len: int  # T
    images: int  # N per sequence
    vision_width: int  # W (= Dv)
    vision_layers: int
    vision_mlp: int  # M
    patch: int  # p
    patches: int  # P (= V, the tokens the resampler sees)
    resampler_depth: int
    resampler_inner: int  # heads x dim_head
    latents: int  # R
    resampler_ff_mult: int
    gated_blocks: int
    xattn_inner: int
    xattn_ff_mult: int
    lm_width: int  # D
    lm_layers: int
    lm_ffn: int  # F_ff
    vocab: int  # V of the head
    frames: int = 1  # F per media item (video)
    lm_kv_width: int = 0  # D_kv, the keys' and values' width (0: D, no grouped-query attention)
    lm_mlp_matrices: int = 2  # k: 3 for a gated (SwiGLU) MLP
    connector: str = "flamingo"  # the preset (flamingo.config.PRESETS): its parts' FLOP terms
    projector_layers: int = 2
    image_tokens: int = 0  # V of the projector: the tower's tokens an image (CLS included if kept)
    lm_trains: bool = False  # the LM's weights train (LLaVA's stage 2)
    new_tokens: int = 0  # k, the new token rows (their embedding product and head columns)
    qformer_layers: int = 0  # the Q-Former's (connector: qformer)
    qformer_width: int = 0  # H
    qformer_intermediate: int = 0
    qformer_cross_every: int = 2
    queries: int = 0  # Q
    tower: str = "open_clip"  # vision.kind (flamingo.parts.TOWERS): its FLOP term
    tiles: int = 1  # a tiled tower's tiles an image (Llama 3.2 Vision's max_num_tiles)
    vision_global_layers: int = 0  # its global layers, after the local ones
    vision_seq: int = 0  # its tokens a tile as its layers see them (patches + CLS, padded to 8)
    media_width: int = 0  # the tower's output width where it is not vision_width (0: it is)


def _terms(s: StepShape) -> dict[str, tuple[float, float]]:
    """Every part's forward FLOPs for the whole batch, with its forward + backward factor: the
    LM and its head here; the tower's (an image's), the connector's and the fusion's from their
    own terms (``flamingo.parts``: ``Tower.flops``, ``Connector.flops``, ``Fusion.flops``)."""
    t, d = s.seq_len, s.lm_width
    kv = s.lm_kv_width or d
    lm = s.lm_layers * 2 * t * (2 * d * d + 2 * d * kv + s.lm_mlp_matrices * d * s.lm_ffn)
    lm_attention = s.lm_layers * 4 * t * t * d
    head = 2 * t * d * s.vocab
    items = s.batch * s.images
    trains = 3 if s.lm_trains else 2  # weight gradients too when the LM trains
    parts = parts_of(
        FlamingoConfig(connector=s.connector, vision=VisionConfig(kind=s.tower, pretrained=None))
    )
    terms = {
        "vision": (float(parts.tower.flops(s) * items * s.frames), 1),  # frozen: no gradient
        "lm": (float(lm * s.batch), trains),
        "lm_attention": (float(lm_attention * s.batch), 3),
        "head": (float(head * s.batch), trains),
    }
    if s.new_tokens:  # the head's k columns and the embedding's one-hot product of k rows
        # backward: the columns' input and weight gradients (3F), the rows' weight gradient (2F)
        terms["new_tokens"] = (float(4 * t * d * s.new_tokens * s.batch), 2.5)
    return {**terms, **parts.connector.flops(s), **parts.fusion.flops(s)}


def forward_flops(s: StepShape) -> dict[str, float]:
    """Forward FLOPs of each part for the whole batch."""
    return {name: flops for name, (flops, _) in _terms(s).items()}


def conventional_flops(num_parameters: int, tokens: int) -> float:
    """The usual training-FLOP estimate, ``6 N tokens``: forward and backward with weight
    gradients for every parameter (the figure most MFU reports use)."""
    return 6.0 * num_parameters * tokens


def train_step_flops(s: StepShape) -> dict[str, float]:
    """Training-step FLOPs of each part (forward and backward) and their ``total``."""
    parts = {name: flops * factor for name, (flops, factor) in _terms(s).items()}
    return {**parts, "total": sum(parts.values())}
