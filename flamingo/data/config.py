"""The configuration of one training dataset (its shards, batching, augmentation, bad-input
limits). The training config holds a list of them (:mod:`flamingo.training.config`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flamingo.chat import TEMPLATES
from flamingo.typed_config import YamlConfig, positive


@dataclass(frozen=True)
class DatasetConfig(YamlConfig):
    """One training dataset: a set of webdataset shards of one kind (ARCHITECTURE.md: the data path)."""

    name: str
    """Name used in logs, counters and per-dataset losses."""
    kind: Literal["pairs", "interleaved", "video", "conversation"]
    """Shard schema (flamingo/data/schema.py)."""
    shards: str
    """Shard paths: brace expansion (``data/pairs-{00000..00099}.tar``), ``::`` lists and globs
    (``data/mmc4-*.tar``, sorted)."""
    batch_size: int = 8
    """Sequences per micro-batch."""
    seq_len: int = 32
    """Tokens per sequence (paper/OpenFlamingo: 32 for pairs and video, 256 for interleaved)."""
    packing: Literal["none", "block_diagonal", "cross_document"] = "none"
    """Several samples per row of ``packed_len`` tokens (fewer padding tokens, bigger matrix
    products; docs/data.md, "Packing"): ``block_diagonal`` keeps each sample's self-attention,
    positions, images and loss to itself (exact: every sample gets the loss it has alone);
    ``cross_document`` lets self-attention run over the whole row, as IDEFICS trained (this
    changes the results; images and loss still stop at each sample's boundary); ``none``:
    one sample per row."""
    packed_len: int | None = None
    """Tokens per packed row (default ``seq_len``, which still bounds each sample): e.g.
    ``seq_len: 32, packed_len: 256`` packs about eight captions a row."""
    pack_window: int = 256
    """Packing: samples packed together (best-fit decreasing), then delivered ``batch_size``
    rows at a time; more leaves less padding and holds more decoded samples in memory."""
    max_images: int = 5
    """Images per interleaved sequence (paper: 5); pairs and video always have one."""
    num_frames: int = 8
    """Frames per video clip, sampled evenly from the stored ones."""
    template: str = "vicuna_v1"
    """Conversations: how the turns are written (``flamingo.chat.TEMPLATES``: ``vicuna_v1``,
    LLaVA-1.5's; ``plain``); the loss is on the assistant's replies only."""
    loss_weight: float = 1.0
    """lambda_m of this dataset in the weighted loss (paper: interleaved 1.0, pairs 0.2, video
    0.03)."""
    resampled: bool = True
    """Draw shards with replacement forever (training); false: one pass per epoch."""
    at_epoch_end: Literal["next_epoch", "stop"] = "next_epoch"
    """Epoch mode (``resampled: false``): once every shard is read, start the next epoch
    (logged), or stop the run (a checkpoint at the last full step, then the export), naming
    this dataset."""
    shuffle_buffer: int = 256
    """Samples shuffled together within a shard (0: stored order)."""
    p_next_image: float = 0.5
    """Interleaved: probability that a document's text is tied to the next image instead of
    the previous one (paper, M3W)."""
    p_leading_space: float = 0.5
    """Pairs and video: probability of a leading space before the caption."""
    p_flip: float = 0.5
    """Per-sample horizontal flip probability (set 0 when text refers to left/right)."""
    max_text_chars: int = 100_000
    """Longer texts are skipped as malformed (counted)."""
    max_image_pixels: int = 89_478_485
    """Larger images are skipped as decompression bombs (counted); PIL's default."""
    max_skip_rate: float = 0.5
    """Abort when more than this fraction of samples is skipped (after ``min_samples_for_skip_rate``)."""
    min_samples_for_skip_rate: int = 200
    """Samples a stream must have seen before the skip rate is enforced."""

    @property
    def row_len(self) -> int:
        """Tokens a row of this dataset's batches holds at most."""
        return self.packed_len or self.seq_len

    def __post_init__(self) -> None:
        for key in (
            "batch_size",
            "seq_len",
            "max_images",
            "num_frames",
            "max_text_chars",
            "max_image_pixels",
            "pack_window",
        ):
            positive(key, getattr(self, key))
        for key in ("p_next_image", "p_leading_space", "p_flip", "max_skip_rate"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        if self.packed_len is not None:
            if self.packing == "none":
                raise ValueError(
                    f"dataset {self.name}: packed_len is the row length of packed batches; "
                    "set packing: block_diagonal (or cross_document), or drop packed_len"
                )
            if self.packed_len < self.seq_len:
                raise ValueError(
                    f"dataset {self.name}: packed_len {self.packed_len} < seq_len "
                    f"{self.seq_len}: a row must hold at least one whole sample"
                )
        if self.template not in TEMPLATES:
            raise ValueError(
                f"dataset {self.name}: template {self.template!r} is not one of {sorted(TEMPLATES)}"
            )
        if self.loss_weight < 0:
            raise ValueError(f"loss_weight must be >= 0, got {self.loss_weight}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.resampled and self.at_epoch_end == "stop":
            raise ValueError(
                f"dataset {self.name}: at_epoch_end: stop needs resampled: false (a resampled "
                "dataset draws shards forever and never runs out)"
            )
