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
from flamingo.vision import image_transform


@dataclass
class ClipPretrainConfig:
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


def load_pairs(spec: str, transform) -> tuple[torch.Tensor, list[str]]:
    images, captions = [], []
    for url in expand_shards(spec):
        for sample in read_shard(url):
            key = next(k for k in sample if k in ("png", "jpg", "jpeg", "webp"))
            images.append(transform(Image.open(io.BytesIO(sample[key])).convert("RGB")))
            captions.append(sample["txt"].decode())
    if len(images) < 2:
        raise ValueError(f"{spec}: need at least two pairs")
    return torch.stack(images), captions


def pretrain(cfg: ClipPretrainConfig) -> dict:
    torch.manual_seed(cfg.seed)
    model = open_clip.CLIP(**cfg.architecture).train()
    vision = VisionConfig(
        model_name="toy-clip",
        pretrained=None,
        architecture=cfg.architecture,
        image_size=cfg.image_size,
    )
    images, captions = load_pairs(cfg.shards, image_transform(vision))
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
        index = rng.sample(range(len(images)), min(cfg.batch_size, len(images)))
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
