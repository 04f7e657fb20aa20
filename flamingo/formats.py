"""Foreign checkpoint formats: one registry, from a format's name to how its checkpoints become
our model, and the one skeleton every conversion runs through.

A format (:class:`Format`) says how to read our model config from a checkpoint (its own
``config.json``, tokenizer and image processor; an OpenFlamingo ``checkpoint.pt`` names none,
its config is given) and how to map the checkpoint's tensors, strictly, into a model built from
that config. Its module in ``flamingo/convert/`` registers it (:func:`register`);
``flamingo/convert/__init__.py`` imports them all, and the registry imports that package the
first time it is asked (:func:`formats`: a plugin registry, filled on first use, so that
``import flamingo`` stays light and this module imports no format module). ``Flamingo.from_pretrained``, ``FlamingoProcessor
.from_pretrained``, the ``python -m flamingo.convert`` CLI and the Hub cache all go through
:func:`convert`; neither the model class nor the processor imports a format module.

:func:`convert` builds the model without storage when every weight comes from the checkpoint
(no random initialisation of billions of weights, no second copy in memory), except for an LM
that ties its embeddings (built without storage, the tie would be lost).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from transformers import AutoConfig

import flamingo.hub as hub
from flamingo.config import FlamingoConfig
from flamingo.layers import building_partitioned_now

M = TypeVar("M")


@dataclass(frozen=True)
class Format:
    """How the checkpoints of one foreign format become our model."""

    name: str
    """The format's name: a transformers ``model_type`` (``idefics``, ``llava``, ``blip-2``),
    or ``openflamingo`` (a ``checkpoint.pt``)."""
    config: Callable[[Any], FlamingoConfig] | None
    """Our model config for a checkpoint of this format (a directory: its ``config.json``,
    tokenizer and ``preprocessor_config.json``); None where the checkpoint names none."""
    load: Callable[[Any, Any], Any]
    """Map the checkpoint's tensors strictly into a model built from its config; returns it."""
    prepare: Callable[[FlamingoConfig], FlamingoConfig] = lambda cfg: cfg
    """Check a given config against what the format can reproduce and set what it needs."""
    storage_free: bool = True
    """Every weight comes from the checkpoint (build the model without storage, when its
    config allows: :func:`building`)."""
    loads_partitioned: bool = False
    """Its loader writes into a model built partitioned (ZeRO-3's ``zero.Init``), tested so:
    it maps through :func:`flamingo.convert.mapping.assign_mapped`, which writes into the
    partitions, and a two-rank run matches the replicated one (Llama 3.2 Vision's)."""
    description: str = ""
    """One line for the command line's help."""


FORMATS: dict[str, Format] = {}
FORMAT_PACKAGE = "flamingo.convert"
"""The package whose import registers every format module in it."""


def formats() -> dict[str, Format]:
    """The registry, the format modules imported (they register themselves) on first use."""
    if not FORMATS:
        importlib.import_module(FORMAT_PACKAGE)
    return FORMATS


def register(fmt: Format) -> Format:
    if fmt.name in FORMATS:
        raise ValueError(f"checkpoint format {fmt.name!r} registered twice")
    FORMATS[fmt.name] = fmt
    return fmt


def lookup(name: str) -> Format:
    if name not in formats():
        raise ValueError(f"unknown checkpoint format {name!r}; registered: {sorted(FORMATS)}")
    return FORMATS[name]


def weights_all_in_files(cfg: FlamingoConfig) -> bool:
    """Whether a checkpoint of ``cfg`` carries every weight (no pretrained tower, an inline LM
    architecture) and its LM does not tie its input and output embeddings (accelerate's
    storage-free building re-creates each parameter, so a tie would be lost)."""
    if cfg.vision.pretrained is not None or cfg.lm.architecture is None:
        return False
    arch = dict(cfg.lm.architecture)
    return not AutoConfig.for_model(arch.pop("model_type"), **arch).tie_word_embeddings


@contextlib.contextmanager
def building(cfg: FlamingoConfig, storage_free: bool = True) -> Iterator[bool]:
    """Build modules with their parameters on the meta device (buffers as usual) when every
    weight of ``cfg`` comes from files (:func:`weights_all_in_files`); yields whether it does.
    Not while an engine builds the model partitioned (its ``zero.Init`` makes the storage)."""
    if not (storage_free and weights_all_in_files(cfg)) or building_partitioned_now():
        yield False
        return
    from accelerate import init_empty_weights  # imported here: only loading needs it

    with init_empty_weights(include_buffers=False):
        yield True


def convert(
    name: str,
    source: Any,
    build: Callable[[FlamingoConfig], M],
    cfg: FlamingoConfig | None = None,
    changes: dict[str, Any] | None = None,
) -> M:
    """A checkpoint of format ``name`` (``source``: a directory, a file, or what the format's
    loader takes) as our model: its config (read from ``source``, or ``cfg``; ``changes``
    applied, e.g. an engine's ``frozen_dtype``), the model built by ``build(config)`` (without
    storage where its weights all come from the checkpoint), the tensors mapped into it."""
    fmt = lookup(name)
    if cfg is None:
        if fmt.config is None:
            raise ValueError(f"a {name} checkpoint names no model config: give one")
        cfg = fmt.config(source)
    cfg = fmt.prepare(cfg.replace(changes) if changes else cfg)
    with building(cfg, fmt.storage_free):
        model = build(cfg)
    return fmt.load(model, source)


def kind_of(directory: str | Path, revision: str | None = None) -> str | None:
    """The registered format a checkpoint directory or Hub id is in (an OpenFlamingo release
    by its id), or None for ours."""
    if str(directory) in hub.OPENFLAMINGO_RELEASES and not Path(directory).is_dir():
        return "openflamingo"
    kind = hub.foreign_type(directory, revision)
    return kind if kind in formats() else None


def converted(
    kind: str,
    directory: str | Path,
    revision: str | None,
    build: Callable[[FlamingoConfig], Any],
    changes: dict[str, Any] | None = None,
) -> Any:
    """A foreign checkpoint as our model: a local directory converted in memory (the model;
    ``changes`` to its config applied), or a Hub id converted once per commit into the cache
    (the converted directory, to load)."""
    if not Path(directory).is_dir() and (changes or building_partitioned_now()):
        raise ValueError(
            f"{directory}: a {kind} Hub id is converted whole into the cache; give its "
            "downloaded files (a directory) to convert it with config changes or partitioned"
        )
    if kind == "openflamingo":  # a release by id: its checkpoint.pt and the config we keep
        checkpoint = hub.download(str(directory), "checkpoint.pt", revision)
        out = hub.converted_dir(str(directory), commit=checkpoint.parent.name)
        if not (out / "config.json").is_file():  # written last: a complete conversion
            cfg = hub.release_config(str(directory))
            with announced(kind, directory, out):
                convert(kind, checkpoint, build, cfg).save_pretrained(out)
        return out
    if Path(directory).is_dir():  # converted in memory, each time
        return convert(kind, directory, build, changes=changes)
    snap = hub.transformers_snapshot(str(directory), revision)
    out = hub.converted_dir(str(directory), commit=snap.name)
    if not (out / "config.json").is_file():
        with announced(kind, directory, out):
            convert(kind, snap, build).save_pretrained(out)
    return out


@contextlib.contextmanager
def announced(kind: str, name: str | Path, out: Path) -> Iterator[None]:
    """Say on stderr what a first load by id is doing (a 9B checkpoint converts for minutes,
    silent otherwise) and how long it took; later loads read ``out`` at once."""
    print(
        f"flamingo: converting the {kind} checkpoint {name} once, into {out} ...",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    yield
    print(
        f"flamingo: converted in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True
    )


def foreign_config(kind: str, directory: str | Path, revision: str | None) -> FlamingoConfig:
    """Our model config of a foreign checkpoint (for its processor), from its own files."""
    files = [p for p in hub.TRANSFORMERS_FILES if not p.endswith(".safetensors")]
    fmt = lookup(kind)
    if fmt.config is None:
        raise ValueError(f"a {kind} checkpoint names no model config")
    return fmt.config(hub.snapshot(directory, revision, files))
