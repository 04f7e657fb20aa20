"""Fast binding (Frozen, Tsimpoukelli et al. 2021): made-up names bound to what images show, a
new binding per episode, so that only the episode's own demonstrations tell the answer. Files
are the official VQA format (eval/tasks/vqa.py) with an ``episode`` on each question; an item
takes its demonstrations from the train items of its episode (``Item.group``). The toy world
writes one (``data_prep/toy_world.py``: names of colours, one-shape images)."""

from __future__ import annotations

from typing import Any

from eval.tasks import register
from eval.tasks.vqa import CocoVQA


@register
class Names(CocoVQA):
    name = "names"

    def group(self, question: dict[str, Any], split: str) -> str:
        if question.get("episode") is None:
            raise ValueError(
                f"{self.name} {split}: question {question['question_id']} has no 'episode'; "
                "every question needs the episode whose demonstrations bind its names"
            )
        return str(question["episode"])
