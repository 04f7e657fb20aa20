"""VQAv2 and OK-VQA (official question/annotation JSON: questions[] with image_id, question,
question_id; annotations[] with question_id, answers[].answer). Images are COCO files named
``COCO_<data_subtype>_<image_id:012d>.jpg``."""

from __future__ import annotations

from typing import Any

from eval.metrics import okvqa_accuracy, vqa_accuracy
from eval.tasks import Item, Task, read_json, register, unique


class CocoVQA(Task):
    kind = "vqa"
    accuracy = staticmethod(vqa_accuracy)

    @classmethod
    def required_paths(cls) -> tuple[str, ...]:
        return ()

    def load(self, split: str) -> list[Item]:
        for key in ("questions", "annotations", "images"):
            if f"{split}_{key}" not in self.paths:
                raise ValueError(f"task {self.name}: the eval config needs {split}_{key}")
        questions = read_json(self.paths[f"{split}_questions"])
        annotations = self.paths[f"{split}_annotations"]
        answers = unique(read_json(annotations)["annotations"], "question_id", annotations)
        subtype = questions.get("data_subtype", f"{split}2014")
        items = []
        for q in questions["questions"]:
            ann = answers.get(q["question_id"])
            if ann is None:
                raise ValueError(
                    f"{self.name} {split}: question {q['question_id']} has no annotation"
                )
            image = self.paths[f"{split}_images"] / f"COCO_{subtype}_{q['image_id']:012d}.jpg"
            items.append(
                Item(
                    id=str(q["question_id"]),
                    image=image,
                    question=q["question"].strip(),
                    answers=[a["answer"] for a in ann["answers"]],
                    group=self.group(q, split),
                )
            )
        return items

    def group(self, question: dict[str, Any], split: str) -> str | None:
        """The ``Item.group`` of a question record (none: demonstrations from any item)."""
        return None

    def score(self, items: list[Item], predictions: dict[str, Any]) -> dict[str, float]:
        metric = self.protocol.vqa_metric
        accs = [self.accuracy(predictions[it.id], it.answers, metric) for it in items]
        return {"accuracy": 100 * sum(accs) / len(accs)}


@register
class VQAv2(CocoVQA):
    name = "vqav2"


@register
class OKVQA(CocoVQA):
    name = "okvqa"
    accuracy = staticmethod(okvqa_accuracy)
