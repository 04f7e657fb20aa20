"""Benchmark registry: one small file per benchmark, registered with :func:`register`.

A task reads its official files into :class:`Item` lists per split, builds prompts (the
formats live in ``eval/prompts.py``), post-processes generations and computes its metric, as
its protocol says (``eval/protocols.py``).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path
from typing import Any, ClassVar, Literal

from eval import prompts
from eval.item import Item
from eval.protocols import Protocol, get_protocol


class Task:
    """Base class; subclasses set ``name``, ``kind`` and implement ``load``."""

    name: ClassVar[str]
    kind: ClassVar[Literal["caption", "vqa", "classification", "binary"]]

    def __init__(self, paths: dict[str, Any], protocol: Protocol | None = None) -> None:
        self.protocol = protocol or get_protocol("official")
        if self.name in self.protocol.unsupported:
            raise ValueError(
                f"task {self.name} under protocol {self.protocol.name}: "
                f"{self.protocol.unsupported[self.name]}"
            )
        self.paths = {k: Path(v) if isinstance(v, str) else v for k, v in paths.items()}
        for key in self.required_paths():
            if key not in self.paths:
                raise ValueError(f"task {self.name}: missing path {key!r} in the eval config")

    @classmethod
    def required_paths(cls) -> tuple[str, ...]:
        return ()

    def load(self, split: str) -> list[Item]:
        raise NotImplementedError

    def files(self, split: str) -> list[str]:
        """The files ``load(split)`` reads (named in errors): the split's paths and the
        task-wide ones."""
        keys = [k for k in self.paths if k.startswith(f"{split}_")] or list(self.paths)
        return [str(self.paths[k]) for k in keys if not self.paths[k].is_dir()]

    def items(self, split: str) -> list[Item]:
        """``load(split)``, checked before anything is generated: every id once, answers
        where the task scores against them, every image present. An error names the files
        and the id."""
        items = self.load(split)
        where = f"task {self.name}, split {split} ({', '.join(self.files(split))})"
        seen: set[str] = set()
        present: set[Path] = set()  # images shared by several items are looked up once
        for item in items:
            if item.id in seen:
                raise ValueError(f"{where}: id {item.id!r} appears twice; each must be unique")
            seen.add(item.id)
            if self.kind in ("caption", "vqa") and not item.answers:
                raise ValueError(
                    f"{where}: item {item.id!r} has an empty answers list: nothing to score "
                    "against; drop it or give its answers"
                )
            if item.image not in present:
                if not Path(item.image).is_file():
                    raise ValueError(
                        f"{where}: the image of item {item.id!r} is missing: {item.image}"
                    )
                present.add(item.image)
        return items

    # -- prompts and answers ------------------------------------------------------------------

    def prompt(self, item: Item, with_answer: bool) -> str:
        style = self.protocol.classification_prompt
        return prompts.render(self.kind, item, with_answer, self.name, style)

    def continuation(self, class_name: str) -> str:
        """The text a class is scored as after the query prompt."""
        return prompts.class_continuation(
            self.kind, class_name, self.protocol.classification_prompt
        )

    def postprocess(self, generated: str) -> str:
        p = self.protocol
        style = p.vqa_postprocess if self.kind == "vqa" else p.caption_postprocess
        return prompts.postprocess(self.kind, generated, style)

    def class_names(self) -> list[str]:
        raise NotImplementedError

    def score(self, items: list[Item], predictions: dict[str, Any]) -> dict[str, float]:
        raise NotImplementedError


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    if cls.name in TASKS:
        raise ValueError(f"task {cls.name!r} registered twice")
    TASKS[cls.name] = cls
    return cls


def get_task(name: str, paths: dict[str, Any], protocol: Protocol | None = None) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered: {sorted(TASKS)}")
    return TASKS[name](paths, protocol)


def _load_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def read_json(path: Path) -> Any:
    """A benchmark's JSON file; missing or damaged (cut short, not JSON), an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file (cut short?): {e}") from None


def unique(records: list[dict], key: str, path: Path) -> dict[Any, dict]:
    """``records`` by ``record[key]``; an id twice is an error naming the file and the id
    (a dict would keep the later record's answers silently)."""
    out: dict[Any, dict] = {}
    for record in records:
        if record[key] in out:
            raise ValueError(f"{path}: {key} {record[key]!r} appears twice; each must be unique")
        out[record[key]] = record
    return out


_load_all()
