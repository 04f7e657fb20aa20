"""Checkpoints of a training run: the run state's one owner, and the directory protocol.

:class:`Checkpointer` decides what a checkpoint holds and how every rank writes and reads it:
the engine's part (trainable weights and optimiser state, DeepSpeed's files under ZeRO), and
per rank a ``trainer_rankNNNNN.json`` with the step, the skipped steps, every loader's
position, the metric history and every RNG; rank 0 adds ``train_config.json``.

:class:`CheckpointDir` is the folder protocol. Checkpoints live in
``OUTPUT/checkpoints/step-00000100/``, written into ``step-00000100.tmp/``; once every rank has
written its part, rank 0 adds a ``COMPLETE`` manifest (every file's size and SHA-256) and
renames the folder, so a kill at any moment leaves the previous complete checkpoint untouched
and ``--resume auto`` never picks a partial one. Resume verifies the manifest: a damaged
checkpoint (a truncated or changed file, one missing) is named with its file and the newest
one that verifies is taken instead.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import random
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flamingo.checkpoint import model_config_from_dict
from flamingo.config import FlamingoConfig
from flamingo.data.pipeline import merge_states
from flamingo.training.batches import Batches
from flamingo.training.config import TrainConfig
from flamingo.training.engine import Engine
from flamingo.training.runlog import RunLogger

COMPLETE = "COMPLETE"
TRAINABLE_STATE = "trainable_state.safetensors"
"""The trainable weights and AdamW's moments, whole (``Engine.trainable_state``)."""
_STEP_DIR = re.compile(r"^step-(\d{8})$")
log = logging.getLogger("flamingo.checkpoints")


def schedule_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What a resume changes in the optimiser's settings and the schedule's length, as
    ``optim.lr 0.001 -> 0.0005`` (a checkpoint from before configs were saved: nothing)."""
    changes = []
    before, after = saved.get("optim", {}), now.get("optim", {})
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            changes.append(f"optim.{key} {before.get(key)} -> {after.get(key)}")
    if "steps" in saved and saved["steps"] != now.get("steps"):
        changes.append(f"steps {saved['steps']} -> {now.get('steps')} (the schedule's length)")
    return changes


class CheckpointError(RuntimeError):
    """No checkpoint to resume from verifies."""


def file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """Every file under ``directory`` (but the marker): size and SHA-256."""
    return {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": file_digest(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != COMPLETE
    }


def verify(directory: Path, part: tuple[int, int] = (0, 1)) -> list[str]:
    """What is wrong with a complete checkpoint (empty: nothing). Every rank of ``part =
    (rank, world)`` checks every file's presence and size, and the checksums of its share of
    the files, so that together they read the checkpoint once."""
    marker = directory / COMPLETE
    try:
        text = marker.read_text()
    except (OSError, UnicodeDecodeError) as e:
        return [f"{marker}: unreadable ({e})"]
    if re.fullmatch(r"\d+\n?", text):  # written before checkpoints had manifests
        log.warning("%s has no manifest (an older checkpoint): not verified", directory)
        return []
    try:
        recorded = json.loads(text)["files"]
        entries = recorded.values()
        if not all(isinstance(e["bytes"], int) and isinstance(e["sha256"], str) for e in entries):
            raise TypeError("a file entry without bytes and sha256")
    except (ValueError, KeyError, TypeError, AttributeError):
        return [f"{marker}: not a checkpoint manifest (damaged?)"]
    problems = []
    rank, world = part
    for i, (name, entry) in enumerate(sorted(recorded.items())):
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, {entry['bytes']} written")
        elif i % world == rank and file_digest(path) != entry["sha256"]:
            problems.append(f"{path}: contents changed since it was written (SHA-256)")
    return problems


DISK_FULL_BYTES = 64 * 2**20
"""Below this much free space, a failed write is taken for a full disk."""


def gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def free_bytes(path: Path) -> int:
    """Free space on the disk holding ``path`` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def checkpoint_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def read_json(path: Path) -> Any:
    """A checkpoint's JSON file, with an error naming it when it is missing or damaged."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: missing from the checkpoint") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: damaged ({type(e).__name__}: {e})") from e


def _everywhere(ok: bool) -> bool:
    return ok


def _same(value: Any) -> Any:
    return value


class CheckpointDir:
    """Naming, completion, verification, discovery and pruning of resumable checkpoints."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def tmp_path(self, step: int) -> Path:
        return self.root / f"step-{step:08d}.tmp"

    def final_path(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def prepare(self, step: int) -> Path:
        """(rank 0) A fresh temporary folder for the checkpoint of ``step``."""
        tmp = self.tmp_path(step)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, step: int) -> Path:
        """(rank 0, after every rank wrote) Write the manifest and move into place atomically."""
        tmp, final = self.tmp_path(step), self.final_path(step)
        record = {"step": step, "files": manifest(tmp)}
        (tmp / COMPLETE).write_text(json.dumps(record, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        return final

    def complete(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and (path / COMPLETE).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1][1] if found else None

    def prune(self, keep: int) -> None:
        """(rank 0) Keep the newest ``keep`` complete checkpoints; drop stale partial ones."""
        for _, path in self.complete()[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
        for path in self.root.glob("step-*.tmp"):
            shutil.rmtree(path, ignore_errors=True)

    def resolve(
        self,
        resume: str,
        part: tuple[int, int] = (0, 1),
        everywhere: Callable[[bool], bool] = _everywhere,
        broadcast: Callable[[Any], Any] = _same,
    ) -> Path | None:
        """``none``, ``auto`` (the newest complete checkpoint that verifies, or None when there
        is none at all) or an explicit checkpoint folder (which must verify).

        ``part`` and ``everywhere`` split the verification over ranks: ``everywhere(ok)`` is
        True when every rank's share verified (a collective), so all ranks pick the same one;
        the candidates are those rank 0 lists (``broadcast``), so every rank tries the same.
        """
        if resume == "none":
            return None
        if resume != "auto":
            path = Path(resume)
            if not (path / COMPLETE).is_file():
                raise FileNotFoundError(
                    f"--resume {resume}: not a complete checkpoint (no {COMPLETE} marker)"
                )
            problems = verify(path, part)
            if not everywhere(not problems):
                raise CheckpointError(
                    f"--resume {resume}: the checkpoint is damaged: {'; '.join(problems)}"
                    if problems
                    else f"--resume {resume}: the checkpoint is damaged (see other ranks' logs)"
                )
            return path
        found = broadcast(self.complete())
        for _, path in reversed(found):
            problems = verify(path, part)
            if everywhere(not problems):
                return path
            for problem in problems:
                log.warning("checkpoint %s is damaged: %s; trying an older one", path, problem)
        if found:
            raise CheckpointError(
                f"no checkpoint in {self.root} verifies ({len(found)} complete, all damaged; "
                "see the warnings above): resume from one by hand with --resume PATH after "
                "repairing it, or start again with --resume none"
            )
        return None


def rng_state() -> dict:
    """Every generator's state as JSON-friendly values (no pickle in checkpoints): Python's,
    NumPy's, torch's on the CPU and, where CUDA runs, this rank's device's (dropout on the
    GPU draws from it)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
    elif "cuda" in state:
        log.warning(
            "the checkpoint was written where CUDA ran; without CUDA here its generator's "
            "state is not restored, so dropout draws differ from the run it continues"
        )


class Checkpointer:
    """Saves and restores a run: the engine, the step counters, the loaders, the metric log
    and the RNGs, on every rank (a collective: every rank calls :meth:`save` and
    :meth:`resume`)."""

    def __init__(
        self,
        root: Path,
        engine: Engine,
        batches: Batches,
        runlog: RunLogger,
        cfg: TrainConfig,
        model_cfg: FlamingoConfig,
    ) -> None:
        self.dir = CheckpointDir(root)
        self.engine, self.batches, self.runlog = engine, batches, runlog
        self.cfg, self.model_cfg = cfg, model_cfg
        self.step = 0
        self.skipped_steps: int | torch.Tensor = 0
        """Steps skipped so far; the loop counts them on the device (read when saved)."""

    def _everywhere(self, ok: bool) -> bool:
        failed = torch.tensor([0.0 if ok else 1.0], device=self.engine.device)
        return float(self.engine.all_reduce_sum(failed)) == 0.0

    def check_shared(self) -> None:
        """(Every rank, before the first step) Refuse an output folder that is not one folder
        for every rank: rank 0 writes a file there that every rank must read back. A
        node-local ``output_dir`` would leave each node's checkpoint files on its own disk,
        where rank 0 never sees them."""
        engine = self.engine
        if engine.world_size == 1:
            return
        token = engine.broadcast_object(secrets.token_hex(8))
        probe = self.dir.root / f".shared-{token}"
        if engine.is_main:
            self.dir.root.mkdir(parents=True, exist_ok=True)
            probe.write_text(token)
        engine.barrier()
        try:
            seen = probe.read_text() == token
        except OSError:
            seen = False
        blind = torch.zeros(engine.world_size, device=engine.device)
        blind[engine.rank] = float(not seen)
        blind = engine.all_reduce_sum(blind)
        engine.barrier()
        if engine.is_main:
            probe.unlink(missing_ok=True)
        missing = [r for r, flag in enumerate(blind.tolist()) if flag]
        if missing:
            raise ValueError(
                f"output_dir is not one folder for every rank: rank(s) {missing} do not see the "
                f"file rank 0 wrote in {self.dir.root}. Checkpoints are written by every rank "
                "into one folder: put output_dir on a filesystem every node shares (NFS, Lustre, "
                "...), with the same path on every node"
            )

    def resume(self, spec: str) -> Path | None:
        """Restore from ``--resume`` (``auto``, ``none`` or a folder); start the metric log
        either way. Returns the checkpoint resumed from, or None. A checkpoint written by
        another number of processes resumes from its world-size-independent state
        (``elastic_checkpoints``), its data positions carried over."""
        engine = self.engine
        self.check_shared()
        path = self.dir.resolve(
            spec, (engine.rank, engine.world_size), self._everywhere, engine.broadcast_object
        )
        history: list[dict[str, Any]] = []
        if path is not None:
            saved = read_json(path / "train_config.json")
            if model_config_from_dict(saved["model"]) != self.model_cfg:
                raise ValueError(
                    f"{path} was trained with another model config; start a new output_dir"
                )
            if engine.is_main:
                changed = schedule_changes(saved.get("train", {}), self.cfg.to_dict())
                if changed:
                    log.warning(
                        "resuming %s with %s changed: the optimiser's state and the step come "
                        "from the checkpoint, the new values apply from here on",
                        path,
                        ", ".join(changed),
                    )
            files = sorted(path.glob("trainer_rank*.json"))
            written = saved.get("world_size", len(files))
            if len(files) != written:
                raise ValueError(
                    f"{path} is incomplete: {len(files)} of the {written} ranks that wrote it "
                    "left their trainer_rank*.json there (a node-local output_dir?); resume from "
                    "an earlier checkpoint (--resume PATH) or start a new output_dir"
                )
            same_engine = saved.get("engine", type(engine).__name__) == type(engine).__name__
            if written == engine.world_size and same_engine:
                state = read_json(path / f"trainer_rank{engine.rank:05d}.json")
                try:
                    engine.load(path)
                except Exception as e:  # a checkpoint from before manifests can be damaged
                    raise RuntimeError(f"cannot load the checkpoint {path}: {e}") from e
                self.batches.load_state_dict(state["loaders"])
            else:
                state = self._resume_elsewhere(path, files)
            self.step, self.skipped_steps = state["step"], state["skipped_steps"]
            history = state.get("history", [])
            set_rng_state(state["rng"])
            log.info("resumed from %s at step %d", path, self.step)
        self.runlog.start(history, self.step)
        return path

    def _resume_elsewhere(self, path: Path, files: list[Path]) -> dict[str, Any]:
        """Resume a checkpoint of another number of processes (or another engine): the
        trainable state from its whole form, every old rank's data positions merged and dealt to the ranks of this run,
        the counters and history of old rank 0, the RNGs of old rank ``rank % old``."""
        engine, written = self.engine, len(files)
        whole = path / TRAINABLE_STATE
        if not whole.is_file():
            raise ValueError(
                f"{path} was written by {written} process(es) of another engine or number and "
                f"holds no {TRAINABLE_STATE} (elastic_checkpoints: false, or an older version): "
                f"resume it as it was written ({written} process(es); this run has "
                f"{engine.world_size}), or start a new output_dir"
            )
        with safe_open(str(whole), framework="pt") as f:
            keys, steps = set(f.keys()), int(f.metadata()["optimizer_steps"])
            engine.load_trainable_state(lambda k: f.get_tensor(k) if k in keys else None, steps)
        states = [read_json(f) for f in files]
        loaders = {
            name: merge_states([s["loaders"][name] for s in states])
            for name in states[0]["loaders"]
        }
        self.batches.load_state_dict(loaders)
        log.warning(
            "resuming %s, written by %d process(es), on %d: the trainable weights and optimiser "
            "state are restored exactly; the data positions are dealt anew (every sample not "
            "yet seen is seen once in epoch mode; resampled datasets draw fresh shards; with "
            "packing a window in progress is read again), and the RNGs are old rank %d's",
            path,
            written,
            engine.world_size,
            engine.rank % written,
        )
        return {**states[0], "rng": states[engine.rank % written]["rng"]}

    def _check_space(self) -> None:
        """Refuse to start a checkpoint the disk cannot hold: the newest complete one's size
        is what the next needs (every rank checks, all stop together)."""
        latest = self.dir.latest()
        needed = checkpoint_bytes(latest) if latest is not None else 0
        free = free_bytes(self.dir.root)
        if self._everywhere(free >= needed):
            return
        raise CheckpointError(
            f"not enough disk space for the checkpoint of step {self.step} in {self.dir.root}: "
            f"{gib(free)} free, the last checkpoint ({latest.name if latest else '-'}) took "
            f"{gib(needed)} (see the other ranks' folders if this one has room). Free space, "
            "lower keep_checkpoints, or point output_dir at a larger disk; the run can resume "
            "from the last complete checkpoint"
        )

    def _write(self, write: Callable[[], None], tmp: Path) -> None:
        """``write()`` into ``tmp``; a failure on a full disk (torch's writer says only
        ``unexpected pos``) is said to be one, naming the folder."""
        try:
            write()
        except (OSError, RuntimeError) as e:
            free = free_bytes(tmp)
            no_space = isinstance(e, OSError) and e.errno == errno.ENOSPC
            if not no_space and free > DISK_FULL_BYTES:
                raise
            raise CheckpointError(
                f"writing the checkpoint {tmp} failed: the disk is full ({gib(free)} free in "
                f"{tmp.parent}). Free space or point output_dir at a larger disk, then resume "
                f"from the last complete checkpoint ({type(e).__name__}: {e})"
            ) from e

    def save(self) -> Path:
        """Write the checkpoint of the current step (every rank its part), then prune."""
        engine, step = self.engine, self.step
        self._check_space()
        if engine.is_main:
            self.dir.prepare(step)
        engine.barrier()
        tmp = self.dir.tmp_path(step)
        self._write(lambda: engine.save(tmp), tmp)
        state = {
            "step": step,
            "skipped_steps": int(self.skipped_steps),
            "loaders": self.batches.state_dict(),
            "history": self.runlog.history,
            "rng": rng_state(),
        }
        trainer = tmp / f"trainer_rank{engine.rank:05d}.json"
        self._write(lambda: trainer.write_text(json.dumps(state)), tmp)
        if self.cfg.elastic_checkpoints:
            whole, steps = engine.trainable_state()  # rank 0's; gathered tensor by tensor
            if engine.is_main:
                meta = {"optimizer_steps": str(steps), "world_size": str(engine.world_size)}
                self._write(lambda: save_file(whole, str(tmp / TRAINABLE_STATE), meta), tmp)
            del whole
        engine.barrier()
        missing = [
            r for r in range(engine.world_size) if not (tmp / f"trainer_rank{r:05d}.json").is_file()
        ]
        if not self._everywhere(not missing or not engine.is_main):
            raise CheckpointError(
                f"the checkpoint {tmp} lacks the files of rank(s) {missing}: they wrote theirs "
                "where rank 0 does not see them. Put output_dir on a filesystem every node shares"
            )
        if engine.is_main:
            configs = {
                "train": self.cfg.to_dict(),
                "model": self.model_cfg.to_dict(),
                "world_size": engine.world_size,
                "engine": type(engine).__name__,
            }
            self._write(lambda: (tmp / "train_config.json").write_text(json.dumps(configs)), tmp)
            self.dir.commit(step)
            self.dir.prune(self.cfg.keep_checkpoints)
        engine.barrier()
        return self.dir.final_path(step)
