"""One evaluation example (every task's items; the prompts render them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Item:
    """One evaluation example."""

    id: str
    image: Path
    question: str = ""
    answers: list[str] = field(default_factory=list)
    """VQA: the annotators' answers; captioning: the reference captions; classification: the
    class name; HatefulMemes: ["yes"] or ["no"]."""
    label: int | None = None
    """Classification / HatefulMemes: the class index."""
    text: str = ""
    """Text printed on the image (HatefulMemes)."""
    group: str | None = None
    """Tasks whose answers only the item's own episode gives (a binding of names made up per
    episode): its demonstrations come from train items of the same group."""
