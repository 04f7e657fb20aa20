"""The model's configuration tree: one frozen sub-config per component.

Each component receives only its own sub-config (``VisionConfig`` for the vision tower,
``ResamplerConfig`` for the Perceiver Resampler, ...); loading, overrides and ``replace`` come
from :mod:`flamingo.typed_config`::

    cfg = FlamingoConfig.from_yaml("configs/model/tiny.yaml", overrides=["resampler.depth=2"])

The data configs live in :mod:`flamingo.data.config`, the training ones in
:mod:`flamingo.training.config`, the evaluation's in ``eval/config.py``.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from flamingo.typed_config import YamlConfig, positive

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig(YamlConfig):
    """The frozen open_clip vision tower (ARCHITECTURE.md: vision.py)."""

    kind: Literal["open_clip", "mllama"] = "open_clip"
    """Which tower (``flamingo.parts.TOWERS``): open_clip's ViTs (the fields below), or
    Llama 3.2 Vision's tiled ViT (``mllama``: ``architecture`` holds transformers'
    ``MllamaVisionConfig`` fields, ``image_size`` is a tile's, the weights come from the
    checkpoint; of the fields below it reads ``image_mean`` and ``image_std``)."""
    model_name: str = "ViT-L-14"
    """open_clip architecture name (``open_clip.list_models()``), or a label when
    ``architecture`` is given inline."""
    pretrained: str | None = "openai"
    """open_clip pretrained tag (e.g. ``openai``, ``laion2b_s32b_b82k``) or a local checkpoint
    path; ``None`` keeps random weights (tests)."""
    architecture: dict | None = None
    """Inline open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) for a custom
    architecture; built without the open_clip registry, so it works offline. Without
    ``text_cfg`` only the vision tower is built (an imported tower whose weights the checkpoint
    carries, ``pretrained: null``)."""
    ln_post_on_tokens: bool = True
    """Apply the tower's final LayerNorm (``ln_post``) to the patch tokens. open_clip >= 2.24
    does by default; the open_clip releases OpenFlamingo was trained with applied it to the
    pooled output only (tokens un-normalised), so OpenFlamingo configs set this to false."""
    cls_token: bool = False
    """Keep the tower's CLS token, first, among the tokens the resampler reads (IDEFICS). The
    paper's and OpenFlamingo's resampler reads the patch tokens only."""
    image_size: int = 224
    """Input resolution; must equal the tower's own."""
    layer_norm_eps: float | None = None
    """Epsilon of the tower's LayerNorms, set on the built tower: an imported tower's own
    (EVA's, BLIP-2's: 1e-6); None keeps what open_clip built (1e-5 for its CLIP towers)."""
    feature_layer: int = -1
    """Which transformer block's output the tokens are, counted as Python indexes the blocks:
    -1 the last (the paper, OpenFlamingo, IDEFICS), -2 the one before it (LLaVA-1.5, whose
    last block is tuned for the contrastive objective, not for describing patches)."""
    resize: Literal["pad", "crop", "squash"] = "pad"
    """How images become squares, in training and inference alike: ``pad`` keeps the aspect
    ratio and pads with the mean colour (paper); ``crop`` resizes the short side and center
    crops (open_clip's and OpenFlamingo's preprocessing); ``squash`` resizes to the square,
    aspect ratio lost (IDEFICS's preprocessing)."""
    crop_offset: Literal["round", "floor"] = "round"
    """``resize: crop``'s offset, half the margin cut: rounded half to even (torchvision's
    ``CenterCrop``: open_clip, OpenFlamingo) or down (transformers' ``CLIPImageProcessor``: a
    LLaVA import sets it). A pixel apart where the margin is 2 mod 4."""
    image_mean: tuple[float, float, float] = OPENAI_MEAN
    """Per-channel normalisation mean of the tower's training."""
    image_std: tuple[float, float, float] = OPENAI_STD
    """Per-channel normalisation std of the tower's training."""

    def __post_init__(self) -> None:
        positive("image_size", self.image_size)
        if self.kind == "mllama":
            if self.pretrained is not None:
                raise ValueError(
                    "vision.kind: mllama takes its weights from the checkpoint: set "
                    f"vision.pretrained: null (got {self.pretrained!r})"
                )
            return
        if self.feature_layer >= 0:
            raise ValueError(
                f"vision.feature_layer counts from the last block: -1 (the last), -2, ...; got "
                f"{self.feature_layer}"
            )
        if self.feature_layer != -1 and self.ln_post_on_tokens:
            raise ValueError(
                f"vision.feature_layer={self.feature_layer} takes an inner block's output, "
                "which the tower's final LayerNorm never sees: set vision.ln_post_on_tokens: "
                "false (as LLaVA does)"
            )
        if self.architecture is not None:
            missing = {"embed_dim", "vision_cfg"} - set(self.architecture)
            if missing:
                raise ValueError(f"architecture is missing {sorted(missing)}")
            if "text_cfg" not in self.architecture and self.pretrained:
                raise ValueError(
                    "vision.architecture without text_cfg builds the vision tower alone, which "
                    f"cannot load the whole-CLIP checkpoint vision.pretrained={self.pretrained!r}: "
                    "give text_cfg too"
                )


@dataclass(frozen=True)
class ResamplerConfig(YamlConfig):
    """Perceiver Resampler (paper Sec. 2.1, Fig. 5)."""

    depth: int = 6
    """Number of (attention, feed-forward) layers."""
    heads: int = 8
    """Attention heads."""
    dim_head: int = 64
    """Width of each attention head."""
    num_latents: int = 64
    """Latents per media item (R in the tensor glossary)."""
    ff_mult: int = 4
    """Feed-forward hidden width as a multiple of the vision width."""
    ff_activation: Literal["gelu", "relu"] = "gelu"
    """The feed-forward's nonlinearity: GELU (OpenFlamingo) or ReLU (IDEFICS)."""
    qk_norm: bool = False
    """LayerNorm each head's queries and keys over the head dimension before the attention
    scores (IDEFICS's ``qk_layer_norms_perceiver``)."""
    max_num_frames: int = 0
    """Learned time embeddings for video frames, up to this many frames; 0 disables them (and
    video input)."""
    spatial_embeddings: bool = False
    """Add a learned embedding per vision-token position (per patch) before resampling. The
    paper and OpenFlamingo add none: their deep encoders carry position in the token features.
    A shallow encoder's tokens may not (the toy world's 2-layer CLIP: attention pooling reads
    an object's position at 29% without them, 83% with), and the resampler's attention pooling
    has no other way to tell where a token came from."""

    def __post_init__(self) -> None:
        for key in ("depth", "heads", "dim_head", "num_latents", "ff_mult"):
            positive(key, getattr(self, key))
        if self.max_num_frames < 0:
            raise ValueError(f"max_num_frames must be >= 0, got {self.max_num_frames}")


@dataclass(frozen=True)
class ProjectorConfig(YamlConfig):
    """LLaVA's connector (``connector: llava``): an MLP from each patch token of the tower to
    the LM's input width; an image becomes that many tokens of the LM's input."""

    layers: int = 2
    """Linear layers: 1 is LLaVA-1.0's linear projection, 2 LLaVA-1.5's ``mlp2x_gelu``."""
    activation: Literal["gelu", "relu", "quick_gelu"] = "gelu"
    """The nonlinearity between the layers (LLaVA-1.5: GELU)."""
    bias: bool = True
    """The linear layers have biases (LLaVA-1.5 does)."""

    def __post_init__(self) -> None:
        if self.layers not in (1, 2):
            raise ValueError(f"projector.layers must be 1 or 2, got {self.layers}")


@dataclass(frozen=True)
class QFormerConfig(YamlConfig):
    """BLIP-2's connector (``connector: qformer``): learned queries that read the tower's tokens
    through a BERT-style transformer, projected into the LM's input; an image becomes
    ``queries`` tokens of the LM's input. The defaults are BLIP-2's (BERT-base)."""

    queries: int = 32
    """Learned query tokens, and so the LM's tokens per image."""
    layers: int = 12
    """Transformer layers."""
    width: int = 768
    """Hidden width."""
    heads: int = 12
    """Attention heads."""
    intermediate: int = 3072
    """Feed-forward width."""
    cross_attention_every: int = 2
    """Layers 0, k, 2k, ... also attend to the tower's tokens (BLIP-2: every other layer)."""
    activation: Literal["gelu", "relu"] = "gelu"
    """The feed-forward's nonlinearity (BERT: GELU)."""
    layer_norm_eps: float = 1e-12
    """Epsilon of the LayerNorms (BERT's)."""
    dropout: float = 0.1
    """Dropout after the embeddings' norm and in each residual output while training (BERT's
    ``hidden_dropout_prob``)."""
    attention_dropout: float = 0.1
    """Dropout on the attention weights while training."""
    max_text_positions: int = 512
    """Stage 1: the text side's position embeddings (BERT's 512)."""
    contrastive_width: int = 256
    """Stage 1: width of the image and text features the contrastive loss compares."""
    temperature: float = 0.07
    """Stage 1: the contrastive loss's learned temperature, its initial value (kept within
    [0.001, 0.5])."""
    label_smoothing: float = 0.1
    """Stage 1: label smoothing of the contrastive and the text-generation losses (BLIP-2's
    code)."""

    def __post_init__(self) -> None:
        for key in (
            "queries",
            "layers",
            "width",
            "heads",
            "intermediate",
            "cross_attention_every",
            "max_text_positions",
            "contrastive_width",
        ):
            positive(key, getattr(self, key))
        if self.width % self.heads:
            raise ValueError(f"qformer.width {self.width} is not divisible by heads {self.heads}")
        for key in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"qformer.{key} must be in [0, 1), got {getattr(self, key)}")
        if not 0.001 <= self.temperature <= 0.5:
            raise ValueError(f"qformer.temperature must be in [0.001, 0.5], got {self.temperature}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(
                f"qformer.label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )


@dataclass(frozen=True)
class CrossAttentionConfig(YamlConfig):
    """GATED XATTN-DENSE blocks inserted into the frozen LM (paper Sec. 2.2, Fig. 4)."""

    every_n_layers: int = 1
    """A gated block runs before every n-th decoder layer."""
    first_layer: int = 0
    """Index of the first decoder layer with a gated block before it: 0 in the paper,
    ``every_n_layers - 1`` in OpenFlamingo."""
    heads: int = 8
    """Cross-attention heads."""
    dim_head: int = 64
    """Width of each cross-attention head."""
    ff_mult: int = 4
    """Gated feed-forward hidden width as a multiple of the LM width."""
    ff_hidden: int = 0
    """Gated feed-forward hidden width in units; 0 means ``ff_mult`` times the LM width
    (IDEFICS: the LM's own MLP width, 11008 for a 4096-wide LM)."""
    ff: Literal["gelu", "swiglu"] = "gelu"
    """Gated feed-forward: norm, Linear, GELU, Linear (paper, OpenFlamingo) or a SwiGLU MLP
    shaped like a Llama one (gate, up and down projections; IDEFICS)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """The blocks' pre-norms, before the cross-attention and the feed-forward: LayerNorm
    (paper, OpenFlamingo) or RMSNorm (IDEFICS, like its LM)."""
    norm_eps: float = 1e-5
    """Epsilon of those norms (IDEFICS: the LM's ``rms_norm_eps``)."""
    qk_norm: bool = False
    """Normalise each head's queries and keys over the head dimension (a norm of the kind
    ``norm`` names) before the attention scores (IDEFICS's ``qk_layer_norms``)."""
    reset_after_eos: bool = False
    """After an end-of-sequence token, text sees no image until the next ``<image>``
    (IDEFICS: a document's text never attends to the previous document's image); the
    end-of-sequence token itself still sees its image. Self-attention is not affected."""
    attend: Literal["last", "all_previous"] = "last"
    """Which images a token sees: the last ``<image>`` at or before it (paper's phi), or all
    images before it."""
    gate: Literal["scalar", "vector"] = "scalar"
    """``tanh`` gates per block: one scalar each (paper) or one value per channel."""
    gating: Literal["tanh", "none"] = "tanh"
    """``tanh``: each residual branch is scaled by ``tanh(alpha)``, alpha initialised to 0
    (paper). ``none``: the paper's "w/o tanh gating" ablation (Table 3): the branches are added
    unscaled, so a fresh model is *not* the LM. An ablation switch, not for real runs."""
    ff_on_imageless_tokens: bool = True
    """Run the gated feed-forward on tokens with no image before them too (OpenFlamingo does;
    the paper is silent). Their cross-attention output is always exactly zero."""

    def __post_init__(self) -> None:
        for key in ("every_n_layers", "heads", "dim_head", "ff_mult", "norm_eps"):
            positive(key, getattr(self, key))
        if self.ff_hidden < 0:
            raise ValueError(
                f"ff_hidden must be >= 0 (0: ff_mult times the LM width), got {self.ff_hidden}"
            )
        if not 0 <= self.first_layer < self.every_n_layers:
            raise ValueError(
                f"first_layer must be in [0, every_n_layers) = [0, {self.every_n_layers}), "
                f"got {self.first_layer}"
            )

    def layer_indices(self, num_layers: int) -> list[int]:
        """Decoder layers that get a gated block before them."""
        return list(range(self.first_layer, num_layers, self.every_n_layers))


@dataclass(frozen=True)
class MllamaFusionConfig(YamlConfig):
    """Llama 3.2 Vision's cross-attention layers (``connector: mllama``; ``flamingo/mllama.py``).
    Their widths, heads and MLP are the LM's own."""

    layers: list[int] = field(default_factory=list)
    """The Llama layers (of the self-attention stack) a cross-attention layer runs before:
    transformers' ``cross_attention_layers`` [3, 8, 13, ...] of the 40-layer stack are
    [3, 7, 11, ...] here (each index less the cross-attention layers before it)."""
    rows_without_image: Literal["zero", "attend_uniformly"] = "zero"
    """What a token that reads no image (text before the first) gets from a layer: nothing
    (``zero``: Meta's reference code, with which the checkpoints were trained, and Flamingo's
    rule), or transformers' numerics (``attend_uniformly``: attention spread evenly over its
    row's vision tokens, gated in, the MLP output zeroed; transformers issue 39379), to
    reproduce a transformers output exactly."""


@dataclass(frozen=True)
class LoRAConfig(YamlConfig):
    """Low-rank adapters on the LM's linear layers (``lm.trainable: lora``, through ``peft``);
    the defaults are LLaVA-1.5's LoRA fine-tuning (``finetune_lora.sh``)."""

    rank: int = 128
    """r: the adapters' rank."""
    alpha: float = 256.0
    """lora_alpha: the adapters' output is scaled by alpha / rank."""
    dropout: float = 0.05
    """Dropout on the adapters' input while training."""
    targets: list[str] | str = "all-linear"
    """The LM's modules that get adapters: module names (``[q_proj, v_proj]``) or
    ``all-linear`` (every linear layer but the LM head, as LLaVA-1.5)."""

    def __post_init__(self) -> None:
        positive("rank", self.rank)
        positive("alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class LanguageConfig(YamlConfig):
    """The frozen Hugging Face causal LM and its tokenizer (ARCHITECTURE.md: lm.py, tokens.py)."""

    name_or_path: str | None = "facebook/opt-1.3b"
    """Hugging Face model id or local directory with weights; ignored when ``architecture`` is
    given."""
    architecture: dict | None = None
    """Inline Hugging Face config (``model_type`` plus fields) for a randomly initialised LM."""
    tokenizer: str | None = None
    """Tokenizer id or directory; ``None`` uses ``name_or_path``; ``tiny`` is the tokenizer
    shipped inside the package."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the model and tokenizer."""
    trust_remote_code: bool = False
    """Allow model code from the hub (needed by some MPT checkpoints)."""
    attn_implementation: str = "sdpa"
    """Hugging Face attention implementation (``sdpa``, ``eager``, ``flash_attention_2``)."""
    disable_dropout: bool = True
    """Zero the frozen LM's dropout probabilities so its output does not depend on train/eval
    mode (Chinchilla, the paper's LM, has none)."""
    special_tokens: Literal["flamingo", "idefics", "llava", "mllama"] = "flamingo"
    """How images are marked in the text: ``flamingo`` adds ``<image>`` and ``<|endofchunk|>``
    (OpenFlamingo's order) to the tokenizer; ``idefics`` uses the tokenizer's own
    ``<fake_token_around_image>``, ``<image>`` and, when it has one, ``<end_of_utterance>``
    (which then ends a chunk), each image written ``<fake_token_around_image><image>`` with a
    closing fake token shared by consecutive images (IDEFICS's prompt form); ``llava`` uses
    the tokenizer's own ``<image>`` (an ``llava-hf`` tokenizer, whose LM has a row for it), adds
    nothing else, and ends a chunk with the end-of-sequence token; ``mllama`` uses Llama 3.2
    Vision's ``<|image|>`` (whose input row the LM has; ``<image>`` in a text is written as
    it), its start token after the images that open a text (``MllamaProcessor``'s rule), and
    ends a chunk with the end-of-sequence token."""
    head_rows: int | None = None
    """Rows of the LM head when it has fewer than the embedding: Llama 3.2 Vision's embedding
    has 8 rows more than its head (``<|image|>``'s among them), which no logit covers."""
    leading_images: Literal["after_bos", "before_bos"] = "after_bos"
    """Where the images that open a text go against the tokenizer's start token:
    ``after_bos``, the text tokenized whole (Flamingo, LLaVA); ``before_bos``, their tokens
    first and the rest tokenized with its start token (BLIP-2's order, ``Blip2Processor``'s; a
    BLIP-2 import sets it). The processor and the training loader both follow it."""
    trainable: Literal["none", "full", "lora"] = "none"
    """Which of the LM's own weights train: ``none`` (Flamingo; LLaVA's stage 1), ``full``
    (LLaVA's stage 2, instruction tuning with the LM unfrozen; under ZeRO-3 for a large LM) or
    ``lora`` (stage 2 with low-rank adapters, ``lora``, the LM's weights frozen). A trained
    LM's weights, or its adapters, are in the checkpoint."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """The adapters of ``trainable: lora``."""
    save_input_embeddings: bool = False
    """Checkpoints carry the LM's whole input embedding matrix, not only the new rows: set by
    the OpenFlamingo import, whose training updated every row."""

    def __post_init__(self) -> None:
        if self.architecture is None and not self.name_or_path:
            raise ValueError("set name_or_path or an inline architecture")
        if self.architecture is not None and "model_type" not in self.architecture:
            raise ValueError("architecture must name its model_type (e.g. llama)")
        if self.name_or_path is None and self.tokenizer is None:
            raise ValueError("tokenizer must be set when the LM has no name_or_path")
        if self.leading_images == "before_bos" and self.special_tokens == "idefics":
            raise ValueError(
                "lm.leading_images: before_bos cannot be IDEFICS's prompt form, which writes "
                "the start token before everything (lm.special_tokens: idefics)"
            )

    def tokenizer_source(self) -> str:
        return self.tokenizer or self.name_or_path


@dataclass(frozen=True)
class Preset:
    """What one value of ``connector:`` composes (``flamingo.parts`` holds the parts' code)."""

    connector: str
    """The connector module (``flamingo.parts.CONNECTORS``)."""
    fusion: str
    """How the LM reads the media (``flamingo.parts.FUSIONS``)."""
    sections: tuple[str, ...]
    """The config sections its parts read: a saved config holds these (and the shared ones)."""
    lm_trains: bool
    """Whether ``lm.trainable`` may train the LM (the Flamingo recipe keeps it frozen)."""
    image_runs: bool
    """Whether an image is a run of ``<image>`` tokens in the text (not IDEFICS's form)."""


PRESETS: dict[str, Preset] = {
    "flamingo": Preset("resampler", "cross_attention", ("resampler", "xattn"), False, False),
    "llava": Preset("projector", "splice", ("projector",), True, True),
    "qformer": Preset("qformer", "splice", ("qformer",), True, True),
    "mllama": Preset("projector", "mllama", ("projector", "mllama"), False, False),
}
"""``connector:`` -> its parts. A new combination of parts is a row here."""

PART_SECTIONS = ("resampler", "xattn", "projector", "qformer", "mllama")
"""The sections that belong to one part or another (the rest every model reads)."""


@dataclass(frozen=True)
class FlamingoConfig(YamlConfig):
    """The whole model: frozen vision tower + resampler + gated blocks in a frozen LM."""

    MOVED_KEYS: ClassVar[dict[str, str]] = {
        "gradient_checkpointing": "engine.activation_checkpointing of the train config"
    }
    """Keys of earlier versions and where they went (named in the unknown-key error)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    """Vision tower."""
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    """Perceiver Resampler."""
    xattn: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
    """Gated cross-attention blocks."""
    lm: LanguageConfig = field(default_factory=LanguageConfig)
    """Language model and tokenizer."""
    connector: Literal["flamingo", "llava", "qformer", "mllama"] = "flamingo"
    """How the LM sees an image: ``flamingo``, the resampler's latents through gated
    cross-attention blocks (``resampler``, ``xattn``); ``llava``, each patch token projected
    (``projector``) into the LM's input, in place of the image's ``<image>`` tokens (one per
    patch token; ARCHITECTURE.md, "Connectors"); ``qformer``, BLIP-2's queries (``qformer``),
    projected into the LM's input in place of ``qformer.queries`` ``<image>`` tokens;
    ``mllama``, Llama 3.2 Vision's: the tiled tower's tokens projected (``projector``, one
    linear layer) and read by its cross-attention layers (``mllama``)."""
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    """LLaVA's projector (``connector: llava``)."""
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    """BLIP-2's Q-Former (``connector: qformer``)."""
    mllama: MllamaFusionConfig = field(default_factory=MllamaFusionConfig)
    """Llama 3.2 Vision's cross-attention layers (``connector: mllama``)."""
    frozen_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the frozen vision tower and LM; trainable parameters stay float32 (paper)."""

    def __post_init__(self) -> None:
        preset = self.preset
        for section in PART_SECTIONS:  # canonical: a part no part reads holds its defaults
            if section not in preset.sections:
                default = type(getattr(self, section))()
                if getattr(self, section) != default:
                    object.__setattr__(self, section, default)
        if preset.image_runs and self.lm.special_tokens == "idefics":
            raise ValueError(
                f"connector: {self.connector} writes each image as a run of <image> tokens; "
                "lm.special_tokens: idefics is IDEFICS's prompt form (a Flamingo): use flamingo "
                "or llava"
            )
        if not preset.lm_trains and self.lm.trainable != "none":
            lm_trains = sorted(n for n, p in PRESETS.items() if p.lm_trains)
            raise ValueError(
                f"lm.trainable: {self.lm.trainable} trains the LM itself, which connector: "
                f"{self.connector} keeps frozen (the paper's recipe); it is a stage 2 of "
                f"connector: {' or '.join(lm_trains)}"
            )

    @property
    def preset(self) -> Preset:
        """The parts ``connector:`` composes."""
        return PRESETS[self.connector]

    def to_dict(self) -> dict[str, Any]:
        """As a dict, holding only the part sections its parts read (a LLaVA config has no
        ``resampler`` or ``xattn``); a missing section loads with its defaults, which the
        sections no part reads always hold (so two configs of one model compare equal)."""
        data = super().to_dict()
        for section in PART_SECTIONS:
            if section not in self.preset.sections:
                del data[section]
        return data


def library_version() -> str:
    try:
        return importlib.metadata.version("flamingo")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
