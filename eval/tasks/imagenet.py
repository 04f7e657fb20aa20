"""ImageNet-style classification: ``<image_root>/<split>/<class id>/*.JPEG`` and a JSON
``{class id: class name}``; classes ranked by the log-likelihood of their names."""

from __future__ import annotations

from typing import Any

from eval.tasks import Item, Task, read_json, register

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


@register
class ImageNet(Task):
    name = "imagenet"
    kind = "classification"

    @classmethod
    def required_paths(cls) -> tuple[str, ...]:
        return ("image_root", "class_names")

    def class_names(self) -> list[str]:
        return list(read_json(self.paths["class_names"]).values())

    def load(self, split: str) -> list[Item]:
        names = read_json(self.paths["class_names"])
        ids = list(names)
        root = self.paths["image_root"] / split
        if not root.is_dir():
            raise FileNotFoundError(f"{root} not found")
        items = []
        for label, class_id in enumerate(ids):
            for path in sorted((root / class_id).glob("*")):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    items.append(
                        Item(
                            id=f"{class_id}/{path.name}",
                            image=path,
                            label=label,
                            answers=[names[class_id]],
                        )
                    )
        return items

    def score(self, items: list[Item], predictions: dict[str, Any]) -> dict[str, float]:
        """predictions[id] = log-likelihood per class (in class_names order)."""
        top1 = [
            max(range(len(predictions[it.id])), key=predictions[it.id].__getitem__) == it.label
            for it in items
        ]
        return {"top1": 100 * sum(top1) / len(top1)}
