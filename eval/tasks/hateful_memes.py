"""HatefulMemes (<split>.jsonl lines {id, img, label, text}); ROC-AUC of P(yes) against the
labels, with "yes"/"no" ranked by log-likelihood."""

from __future__ import annotations

import json
from typing import Any

from eval.metrics import roc_auc
from eval.tasks import Item, Task, register


@register
class HatefulMemes(Task):
    name = "hateful_memes"
    kind = "binary"

    @classmethod
    def required_paths(cls) -> tuple[str, ...]:
        return ("image_root",)

    def class_names(self) -> list[str]:
        return ["no", "yes"]

    def load(self, split: str) -> list[Item]:
        path = self.paths[f"{split}_jsonl"]
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        items = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    d = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}: line {number} is not JSON ({e})") from None
                label = int(d["label"])
                items.append(
                    Item(
                        id=str(d["id"]),
                        image=self.paths["image_root"] / d["img"],
                        text=d["text"],
                        label=label,
                        answers=[self.class_names()[label]],
                    )
                )
        return items

    def score(self, items: list[Item], predictions: dict[str, Any]) -> dict[str, float]:
        """predictions[id] = log-likelihoods of ["no", "yes"]."""
        import math

        p_yes = [1 / (1 + math.exp(predictions[it.id][0] - predictions[it.id][1])) for it in items]
        return {"ROC-AUC": 100 * roc_auc(p_yes, [it.label for it in items])}
