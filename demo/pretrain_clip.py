"""Stage 1: contrastive pretraining of a tiny open_clip model on the toy world's pairs.

    python -m demo.pretrain_clip --config configs/demo/clip.yaml [key=value ...]

Reads image-caption pairs from webdataset shards (the pairs schema), trains the CLIP model
given inline (``architecture``: embed_dim, vision_cfg, text_cfg) with open_clip's own
``ClipLoss``, and saves ``{"state_dict": ...}`` like any open_clip checkpoint: a model config
loads it with ``vision.architecture`` = the same architecture and ``vision.pretrained`` = the
file.
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from PIL import Image
from tqdm import tqdm

from demo.common import cli, summary, warmup_cosine
from flamingo.config import VisionConfig
from flamingo.data.shards import expand_shards, read_shard
from flamingo.typed_config import YamlConfig
from flamingo.vision import image_transform


@dataclass(frozen=True)
class ClipPretrainConfig(YamlConfig):
    shards: str
    """Pairs shards (brace expansion)."""
    output: str
    """Checkpoint file to write."""
    architecture: dict
    """open_clip model config: embed_dim, vision_cfg, text_cfg (vocab_size 49408)."""
    image_size: int = 64
    context_length: int = 32
    batch_size: int = 64
    steps: int = 300
    lr: float = 1e-3
    warmup_steps: int = 20
    seed: int = 0
    group_size: int = 1
    """Draw batches as whole groups of this many consecutive pairs (2 for the toy world, which
    writes each scene next to its twin with one shape changed: in-batch hard negatives)."""

    def __post_init__(self) -> None:
        if self.group_size < 1 or self.batch_size % self.group_size:
            raise ValueError(
                f"group_size={self.group_size} must be >= 1 and divide batch_size={self.batch_size}"
            )


def load_pairs(spec: str, transform, group_size: int = 1) -> tuple[torch.Tensor, list[str]]:
    images, captions = [], []
    for url in expand_shards(spec):
        for sample in read_shard(url):
            key = next(k for k in sample if k in ("png", "jpg", "jpeg", "webp"))
            images.append(transform(Image.open(io.BytesIO(sample[key])).convert("RGB")))
            captions.append(sample["txt"].decode())
    if len(images) < 2 * group_size:
        raise ValueError(f"{spec}: need at least two groups of {group_size} pair(s)")
    return torch.stack(images), captions


def batch_indices(rng: random.Random, n: int, batch_size: int, group_size: int) -> list[int]:
    """A batch of whole groups of ``group_size`` consecutive items out of ``n``, drawn without
    replacement (a trailing incomplete group is never drawn)."""
    num_groups = n // group_size
    groups = rng.sample(range(num_groups), min(batch_size // group_size, num_groups))
    return [g * group_size + j for g in groups for j in range(group_size)]


def pretrain(cfg: ClipPretrainConfig) -> dict:
    torch.manual_seed(cfg.seed)
    model = open_clip.CLIP(**cfg.architecture).train()
    vision = VisionConfig(
        model_name="toy-clip",
        pretrained=None,
        architecture=cfg.architecture,
        image_size=cfg.image_size,
    )
    images, captions = load_pairs(cfg.shards, image_transform(vision), cfg.group_size)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=cfg.context_length)
    texts = tokenizer(captions)
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1)
    rng = random.Random(cfg.seed)
    losses = []
    for step in tqdm(range(cfg.steps), desc="stage 1: CLIP"):
        lr = warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = batch_indices(rng, len(images), cfg.batch_size, cfg.group_size)
        image_features, text_features, logit_scale = model(images[index], texts[index])[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, out)
    result = summary(losses, pairs=len(images), steps=cfg.steps)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    cli("python -m demo.pretrain_clip", __doc__, ClipPretrainConfig, pretrain, argv)


if __name__ == "__main__":
    main()
