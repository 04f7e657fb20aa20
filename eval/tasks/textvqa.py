"""TextVQA (TextVQA_0.5.1_<split>.json: data[] with question_id, question, image_id, answers[];
images ``<image_id>.jpg``)."""

from __future__ import annotations

from eval.tasks import Item, read_json, register
from eval.tasks.vqa import CocoVQA


@register
class TextVQA(CocoVQA):
    name = "textvqa"

    def load(self, split: str) -> list[Item]:
        data = read_json(self.paths[f"{split}_json"])["data"]
        root = self.paths[f"{split}_images"]
        return [
            Item(
                id=str(d["question_id"]),
                image=root / f"{d['image_id']}.jpg",
                question=d["question"].strip(),
                answers=list(d["answers"]),
            )
            for d in data
        ]
