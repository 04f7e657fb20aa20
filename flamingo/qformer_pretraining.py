"""BLIP-2's stage 1: the Q-Former learns, from image-text pairs and with no LM, to pull out of
the frozen tower what the text says (Li et al. 2023, Sec. 3.2, Fig. 2).

:class:`QFormerPretraining` is the frozen tower, the Q-Former with its text side
(:class:`flamingo.qformer.QFormer` given a text vocabulary) and the three heads of the three
objectives of :mod:`flamingo.qformer_losses`, summed unweighted as BLIP-2 does:

- ITC: ``vision_projection`` of each query's output and ``text_projection`` of the text's
  first token ([CLS]), to ``qformer.contrastive_width``, over the learned temperature ``temp``;
- ITM: ``itm_head`` on the queries' outputs, queries and text seeing each other, averaged over
  the queries, for each pair and two hard negatives drawn from the global batch;
- ITG: the text with its first token made [DEC], each token seeing the queries and the text
  before it; BERT's prediction head (``lm_head``: dense, GELU, LayerNorm, then the word
  embeddings, tied, and a bias) predicts the next token.

The text side reads its own vocabulary: the given ``text_vocab`` ids, with [CLS] and [DEC]
among them (BLIP-2: BERT's WordPiece plus [DEC]; :meth:`from_config`: the LM tokenizer's ids
plus two rows of their own). Names follow transformers' ``Blip2ForImageTextRetrieval`` where it
has the part (``vision_projection``, ``text_projection``, ``itm_head``; its ``embeddings`` and
``query_tokens`` are our ``qformer.embeddings``/``qformer.query_tokens``); the Q-Former's
weights then start stage 2 (``qformer.*``, the text side left behind, as BLIP-2 does).

Shapes: ``pixel_values (B, 3, H, W)``, ``input_ids``/``attention_mask (B, T)`` with [CLS] first.

Trained by ``train.py`` with ``objective: qformer_stage1`` (``flamingo/training/stage1.py``);
:meth:`QFormerPretraining.save_pretrained` writes ``qformer_stage1.json``, the trained weights and
the tokenizer; :func:`connector_weights` of its weights is what stage 2 starts from.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from flamingo.checkpoint import load_tensors, model_config_from_dict, save_tensors
from flamingo.config import FlamingoConfig, QFormerConfig
from flamingo.layers import DEFAULT_POLICY, ExecutionPolicy, compile_each, set_policy, torch_dtype
from flamingo.losses import IGNORE
from flamingo.parts import parts_of
from flamingo.parts.connectors import QFormerConnector
from flamingo.qformer import QFormer, QFormerLayer
from flamingo.qformer_losses import (
    contrastive_loss,
    gather,
    hard_negatives,
    itg_mask,
    matching_loss,
    query_text_similarity,
    rank_offset,
)
from flamingo.vision import VisionEncoder

TEMPERATURE_RANGE = (0.001, 0.5)  # BLIP-2 clamps its temperature to it before every step
CONFIG_NAME = "qformer_stage1.json"
WEIGHTS_NAME = "qformer_stage1.safetensors"
HEADS = ("vision_projection", "text_projection", "itm_head", "lm_head", "temp")


@dataclass(frozen=True)
class TextVocabulary:
    """The text side's vocabulary: its size and the ids of its special tokens."""

    size: int
    cls: int
    """Starts the text for ITC and ITM (BERT's [CLS])."""
    dec: int
    """Takes [CLS]'s place for ITG (BLIP-2's [DEC])."""

    @classmethod
    def after(cls, tokenizer: Any) -> TextVocabulary:
        """A tokenizer's ids, and [CLS] and [DEC] as two more after them."""
        size = len(tokenizer)
        return cls(size + 2, size, size + 1)


class Stage1Output(NamedTuple):
    loss: torch.Tensor
    """``itc + itm + itg``, what trains."""
    itc: torch.Tensor
    itm: torch.Tensor
    itg: torch.Tensor


class TextHead(nn.Module):
    """BERT's prediction head; the output matrix is the word embeddings (tied)."""

    def __init__(self, cfg: QFormerConfig, vocab: int) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.width, cfg.width)
        self.LayerNorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)  # noqa: N815 (BERT's)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, hidden: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.LayerNorm(F.gelu(self.dense(hidden))), embeddings, self.bias)


class Temperature(nn.Module):
    """The contrastive loss's learned temperature."""

    def __init__(self, value: float) -> None:
        super().__init__()
        # (1,), not 0-d: DeepSpeed broadcasts parameters as bytes, which a 0-d one cannot be
        self.value = nn.Parameter(torch.tensor([float(value)]))

    def forward(self) -> torch.Tensor:
        """Within :data:`TEMPERATURE_RANGE`: the clamped value, the gradient passed to the
        parameter unchanged (BLIP-2 clamps the parameter in place before each step; in place
        does not survive a sharded parameter)."""
        t = self.value[0]
        return t + (t.clamp(*TEMPERATURE_RANGE) - t).detach()


def read_export(directory: str | Path) -> tuple[FlamingoConfig, TextVocabulary]:
    """The model config and text vocabulary of a stage-1 export (:meth:`save_pretrained`)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} has no {CONFIG_NAME}: not the export of a train.py run with "
            "objective: qformer_stage1"
        )
    meta = json.loads(path.read_text())
    return model_config_from_dict(meta["model"]), TextVocabulary(**meta["vocabulary"])


def connector_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stage 1's weights (by our names, ``qformer.*`` among them) -> what stage 2's
    ``connector: qformer`` has, by its Q-Former's names: the queries, the LayerNorm and each
    layer's attention, cross-attention and query feed-forward; not the text side (the
    embeddings, each layer's ``intermediate``/``output``), which stage 2 leaves behind."""
    out = {}
    for name, tensor in weights.items():
        if not name.startswith("qformer."):
            continue
        inner = name.removeprefix("qformer.")
        parts = inner.split(".")  # encoder.layer.{i}.{part}...
        if parts[0] != "embeddings" and parts[3:4] not in (["intermediate"], ["output"]):
            out[inner] = tensor
    return out


def _padding(mask: torch.Tensor) -> torch.Tensor:
    """``(B, 1, L)``: every row may attend to the real tokens only."""
    return mask.bool()[:, None, :]


def check_qformer(cfg: FlamingoConfig, what: str) -> None:
    """Stage 1, and stage 2's start from it, need BLIP-2's Q-Former as the connector."""
    connector = parts_of(cfg).connector
    if not isinstance(connector, QFormerConnector):
        raise ValueError(
            f"{what} trains BLIP-2's Q-Former; the model's is {connector.describe()}: set "
            "connector=qformer"
        )


class QFormerPretraining(nn.Module):
    """Frozen tower + the Q-Former with its text side + the heads of the three losses."""

    def __init__(self, cfg: QFormerConfig, vision: VisionEncoder, vocab: TextVocabulary) -> None:
        super().__init__()
        self.cfg, self.vocab = cfg, vocab
        self.vision = vision
        self.qformer = QFormer(cfg, vision.width, None, text_vocab=vocab.size)
        self.vision_projection = nn.Linear(cfg.width, cfg.contrastive_width)
        self.text_projection = nn.Linear(cfg.width, cfg.contrastive_width)
        self.itm_head = nn.Linear(cfg.width, 2)
        self.lm_head = TextHead(cfg, vocab.size)
        self.temp = Temperature(cfg.temperature)
        self.policy = DEFAULT_POLICY
        self.model_cfg: FlamingoConfig | None = None  # set by from_config: what save writes

    @classmethod
    def from_config(cls, cfg: FlamingoConfig, tokenizer: Any) -> QFormerPretraining:
        """Stage 1 for a ``connector: qformer`` model config: its tower (frozen, from its
        source, in ``frozen_dtype``) and Q-Former, the text side over ``tokenizer``'s ids
        (:meth:`TextVocabulary.after`)."""
        check_qformer(cfg, "BLIP-2's stage 1")
        vision = VisionEncoder(cfg.vision).to(torch_dtype(cfg.frozen_dtype))
        model = cls(cfg.qformer, vision, TextVocabulary.after(tokenizer))
        model.model_cfg = cfg
        return model

    # -- what trains, what is saved ---------------------------------------------------------------

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The Q-Former (queries, layers, text side) and the heads; the tower is frozen."""
        return {"qformer": self.qformer, **{name: getattr(self, name) for name in HEADS}}

    def decayed_modules(self) -> list[nn.Module]:
        """Weight decay on every trained matrix (BLIP-2: all but biases and norms)."""
        return [m for name, m in self.trainable_modules().items() if name != "temp"]

    def external_parameters(self) -> list[tuple[nn.Module, list[nn.Parameter]]]:
        """The text head reads the word embeddings (tied)."""
        return [(self.lm_head, [self.qformer.embeddings.word_embeddings.weight])]

    def set_execution_policy(self, policy: ExecutionPolicy) -> None:
        set_policy(self, policy)

    def compile_blocks(self, **options: Any) -> int:
        """``torch.compile`` each Q-Former layer and tower block (see ``Flamingo``'s)."""
        return compile_each(self, (QFormerLayer, self.vision.block_class()), **options)

    def exported_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def connector_state(self) -> dict[str, torch.Tensor]:
        """:func:`connector_weights` of this model: what stage 2 would start from."""
        return connector_weights({n: p.detach() for n, p in self.named_parameters()})

    def save_pretrained(
        self, directory: str | Path, tokenizer: Any, tensors: dict[str, torch.Tensor] | None = None
    ) -> Path:
        """The trained weights (``tensors`` replaces them by name: a sharded engine's full
        copies), the model config and vocabulary, the tokenizer; the tower is rebuilt from
        its source on loading."""
        if self.model_cfg is None:
            raise ValueError("save_pretrained needs a model built by from_config (its config)")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        names = self.exported_names()
        params = dict(self.named_parameters())
        weights = {n: (tensors[n] if tensors is not None else params[n].detach()) for n in names}
        save_tensors(weights, directory / WEIGHTS_NAME)
        tokenizer.save_pretrained(directory)
        meta = {"model": self.model_cfg.to_dict(), "vocabulary": asdict(self.vocab)}
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2))  # last: complete
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> QFormerPretraining:
        """A stage-1 model written by :meth:`save_pretrained` (its tower from its source)."""
        cfg, vocab = read_export(directory)
        vision = VisionEncoder(cfg.vision).to(torch_dtype(cfg.frozen_dtype))
        model = cls(cfg.qformer, vision, vocab)
        model.model_cfg = cfg
        expected = {n: p for n, p in model.named_parameters() if p.requires_grad}
        tensors = load_tensors(Path(directory) / WEIGHTS_NAME, expected)
        model.load_state_dict(tensors, strict=False)
        return model.eval()

    # -- the batches of train.py ------------------------------------------------------------------

    def texts(
        self, input_ids: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The Q-Former's text of a batch of pairs from the loader: [CLS] then the caption (the
        tokens that are targets: the caption and its end of chunk), moved to the front, padded
        at the end (``(B, T + 1)`` ids and mask; no host sync)."""
        keep = labels != IGNORE
        b, t = input_ids.shape
        position = keep.long().cumsum(1)  # 1, 2, ... for the kept tokens: after [CLS]
        spill = torch.full_like(position, t + 1)  # the dropped go to a column cut off below
        ids = input_ids.new_zeros(b, t + 2)
        ids.scatter_(1, torch.where(keep, position, spill), input_ids)
        ids[:, 0] = self.vocab.cls
        lengths = keep.sum(1, keepdim=True) + 1
        mask = (torch.arange(t + 1, device=ids.device) < lengths).long()
        return ids[:, : t + 1] * mask, mask

    # -- the three views of a pair ----------------------------------------------------------------

    def vision_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, V, Dv)``: the frozen tower's tokens."""
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must be (B, 3, H, W), one image per text; got shape "
                f"{tuple(pixel_values.shape)}"
            )
        return self.vision(pixel_values[:, None, None])[:, 0, 0]

    def image_features(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """``(B, Q, E)``: each query's contrastive feature, L2-normalised (queries alone)."""
        return F.normalize(self.vision_projection(self.qformer.encode(vision_tokens)), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, E)``: the text's [CLS] output, projected and L2-normalised (text alone)."""
        hidden = self.qformer.encode(None, input_ids, _padding(attention_mask))
        return F.normalize(self.text_projection(hidden[:, 0]), dim=-1)

    def similarity(
        self, vision_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """``(B_images, B_texts)``: ITC's image-text similarity (the best query's cosine)."""
        texts = self.text_features(input_ids, attention_mask)
        return query_text_similarity(self.image_features(vision_tokens), texts)

    def match_logits(
        self, vision_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """``(B, 2)``: ITM's (no match, match) logits of image i with text i."""
        queries = self.cfg.queries
        ones = attention_mask.new_ones(attention_mask.shape[0], queries)
        mask = _padding(torch.cat([ones, attention_mask], dim=1))
        hidden = self.qformer.encode(vision_tokens, input_ids, mask)
        return self.itm_head(hidden[:, :queries]).mean(dim=1)

    def generation_logits(
        self, vision_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """``(B, T, vocab)``: ITG's next-token logits at each text position (its first token
        made [DEC]), each seeing the queries and the text up to it."""
        ids = input_ids.clone()
        ids[:, 0] = self.vocab.dec
        mask = itg_mask(self.cfg.queries, attention_mask)
        hidden = self.qformer.encode(vision_tokens, ids, mask)[:, self.cfg.queries :]
        return self.lm_head(hidden, self.qformer.embeddings.word_embeddings.weight)

    # -- training ---------------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> Stage1Output:
        """The three losses of a batch of pairs (this rank's part of the global batch)."""
        batch = input_ids.shape[0]
        vision = self.vision_tokens(pixel_values)
        query_feats = self.image_features(vision)
        text_feats = self.text_features(input_ids, attention_mask)
        smoothing = self.cfg.label_smoothing
        temperature = self.temp()
        itc, i2t, t2i = contrastive_loss(
            query_feats, text_feats, temperature, label_smoothing=smoothing
        )

        # ITM: each pair, each image with a hard negative text, each text with a hard negative
        # image, the negatives from anywhere in the global batch
        all_vision, all_ids, all_mask = gather(vision), gather(input_ids), gather(attention_mask)
        scale = temperature.detach()  # drawn from softmax(similarity / temperature), as BLIP-2
        neg_text, neg_image = hard_negatives(
            i2t / scale, t2i / scale, rank_offset(batch), generator
        )
        logits = self.match_logits(
            torch.cat([vision, vision, all_vision[neg_image]]),
            torch.cat([input_ids, all_ids[neg_text], input_ids]),
            torch.cat([attention_mask, all_mask[neg_text], attention_mask]),
        )
        itm = matching_loss(logits, batch)

        # ITG: the next text token from the queries and the text before it
        scores = self.generation_logits(vision, input_ids, attention_mask)[:, :-1]
        labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE)
        itg = F.cross_entropy(
            scores.flatten(0, 1).float(), labels.flatten(), label_smoothing=smoothing
        )
        return Stage1Output(itc + itm + itg, itc, itm, itg)
