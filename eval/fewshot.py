"""Choosing demonstrations: random per item (seeded) or RICES (Flamingo App. A.2: the query
set items nearest to the test image by frozen vision features, most similar last)."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from eval.tasks import Item


def query_set(train_items: list[Item], size: int, seed: int) -> list[Item]:
    """The demonstration pool: ``size`` train items drawn once per trial; every train item
    when the items have an ``Item.group`` (each group's items are its own pool, which a draw
    over all groups would thin unevenly)."""
    if len(train_items) < 2:
        raise ValueError("need at least 2 train items for demonstrations")
    if any(it.group is not None for it in train_items):
        return list(train_items)
    rng = random.Random(f"query/{seed}")
    return rng.sample(train_items, min(size, len(train_items)))


def may_show(demo: Item, item: Item) -> bool:
    """Whether ``demo`` may be a demonstration of ``item``: any pool item, or with
    ``Item.group`` one of its group (never itself)."""
    return item.group is None or (demo.group == item.group and demo.id != item.id)


def random_demos(pool: list[Item], item: Item, shots: int, seed: int) -> list[Item]:
    """``shots`` demonstrations for ``item`` (from its group, if it has one), seeded by the
    trial and the item."""
    rng = random.Random(f"demos/{seed}/{item.id}")
    candidates = [p for p in pool if may_show(p, item)]
    return rng.sample(candidates, min(shots, len(candidates)))


class RICES:
    """Retrieval-based In-Context Example Selection over a demonstration pool."""

    def __init__(self, pool: list[Item], pool_features: torch.Tensor) -> None:
        self.pool = pool
        self.features = torch.nn.functional.normalize(pool_features.float(), dim=-1)

    def demos(
        self, query_features: torch.Tensor, shots: int, queries: list[Item] | None = None
    ) -> list[list[Item]]:
        """For each query row: the ``shots`` most similar pool items, most similar LAST; with
        ``queries`` that have an ``Item.group``, among the items of their group only."""
        q = torch.nn.functional.normalize(query_features.float(), dim=-1)
        similarity = q @ self.features.T  # (Q, P)
        if queries is not None and any(it.group is not None for it in queries):
            allowed = torch.tensor(
                [[may_show(p, it) for p in self.pool] for it in queries], dtype=torch.bool
            )
            similarity = similarity.masked_fill(~allowed, float("-inf"))
        top = similarity.topk(min(shots, len(self.pool)), dim=-1)  # most similar first
        return [
            [
                self.pool[int(i)]
                for i, s in zip(row.flip(0), sims.flip(0), strict=True)
                if s.isfinite()
            ]
            for row, sims in zip(top.indices, top.values, strict=True)
        ]


def features_path(cache_dir: Path, cache_key: str, items: list[Item]) -> Path:
    """Where the features of ``items`` under ``cache_key`` are cached (the ids are hashed in)."""
    ids = "\n".join(it.id for it in items)
    digest = hashlib.sha1(f"{cache_key}\n{ids}".encode()).hexdigest()[:16]
    return cache_dir / f"rices-{digest}.safetensors"


def load_features(path: Path) -> torch.Tensor:
    return load_file(str(path))["features"]


def save_features(path: Path, features: torch.Tensor) -> None:
    """Written under a temporary name, then renamed: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({"features": features.contiguous()}, str(tmp))
    os.replace(tmp, path)


def encode_images(encode, items: list[Item], load_image, batch_size: int = 32) -> torch.Tensor:
    """(N, D) features of ``items``' images, ``batch_size`` images per ``encode`` call."""
    chunks = []
    for start in tqdm(range(0, len(items), batch_size), desc="RICES features", leave=False):
        images = [load_image(it.image) for it in items[start : start + batch_size]]
        chunks.append(encode(images))
    return torch.cat(chunks)


def open_rgb(path: Path) -> Image.Image:
    if not Path(path).is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return Image.open(path).convert("RGB")
