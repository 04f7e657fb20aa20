"""Fast binding (Frozen, Tsimpoukelli et al. 2021): made-up names bound to what images show, a
new binding per episode, so that only the episode's own demonstrations tell the answer. Files
are the official VQA format (eval/tasks/vqa.py) with an ``episode`` on each question; an item
takes its demonstrations from the train items of its episode (``Item.group``). The toy world
writes one (``data_prep/toy_world.py``: names of colours, one-shape images)."""

from __future__ import annotations

from dataclasses import replace

from eval.tasks import Item, read_json, register
from eval.tasks.vqa import CocoVQA


@register
class Names(CocoVQA):
    name = "names"

    def load(self, split: str) -> list[Item]:
        items = super().load(split)
        questions = read_json(self.paths[f"{split}_questions"])["questions"]
        episodes = {str(q["question_id"]): q.get("episode") for q in questions}
        missing = [i for i, e in episodes.items() if e is None]
        if missing:
            raise ValueError(
                f"{self.name} {split}: question {missing[0]} has no 'episode' "
                f"({len(missing)} of {len(episodes)} lack one); every question needs the "
                "episode whose demonstrations bind its names"
            )
        return [replace(it, group=str(episodes[it.id])) for it in items]
