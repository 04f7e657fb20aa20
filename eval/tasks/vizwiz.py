"""VizWiz VQA (<split>.json: a list of {image, question, answers[].answer}); an item's id is
its image file name."""

from __future__ import annotations

from eval.tasks import Item, read_json, register
from eval.tasks.vqa import CocoVQA


@register
class VizWiz(CocoVQA):
    name = "vizwiz"

    def load(self, split: str) -> list[Item]:
        root = self.paths[f"{split}_images"]
        return [
            Item(
                id=d["image"],
                image=root / d["image"],
                question=d["question"].strip(),
                answers=[a["answer"] for a in d["answers"]],
            )
            for d in read_json(self.paths[f"{split}_json"])
        ]
