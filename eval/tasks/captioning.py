"""COCO and Flickr30K captioning on the Karpathy splits (dataset_coco.json /
dataset_flickr30k.json: images[] with filepath?, filename, split, sentences[].raw)."""

from __future__ import annotations

from typing import Any

from eval.metrics import caption_scores
from eval.tasks import Item, Task, read_json, register

KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


class KarpathyCaptioning(Task):
    kind = "caption"

    @classmethod
    def required_paths(cls) -> tuple[str, ...]:
        return ("karpathy_json", "image_root")

    def load(self, split: str) -> list[Item]:
        if split not in KARPATHY_SPLITS:
            raise ValueError(
                f"{self.name}: split {split!r} is not one of {sorted(KARPATHY_SPLITS)}"
            )
        data = read_json(self.paths["karpathy_json"])
        splits = self.protocol.caption_train_splits if split == "train" else KARPATHY_SPLITS[split]
        items = []
        for image in data["images"]:
            if image["split"] not in splits:
                continue
            path = self.paths["image_root"] / image.get("filepath", "") / image["filename"]
            image_id = str(image.get("cocoid", image.get("imgid", image["filename"])))
            captions = [s["raw"].strip() for s in image["sentences"]]
            items.append(Item(id=image_id, image=path, answers=captions))
        return items

    def score(self, items: list[Item], predictions: dict[str, Any]) -> dict[str, float]:
        refs = {it.id: it.answers for it in items}
        scores = caption_scores({k: predictions[k] for k in refs}, refs, meteor=False)
        return {"CIDEr": 100 * scores["CIDEr"], "BLEU-4": 100 * scores["BLEU-4"]}


@register
class Coco(KarpathyCaptioning):
    name = "coco"


@register
class Flickr30k(KarpathyCaptioning):
    name = "flickr30k"
