"""Run directories: checkpoint bookkeeping and metric logging for ``train.py``.

Checkpoints live in ``OUTPUT/checkpoints/step-00000100/``. A checkpoint is written into
``step-00000100.tmp/``; once every rank has written its part, rank 0 adds a ``COMPLETE``
manifest (every file's size and SHA-256) and renames the folder, so a kill at any moment
leaves the previous complete checkpoint untouched and ``--resume auto`` never picks a partial
one. Resume verifies the manifest: a damaged checkpoint (a truncated or changed file, one
missing) is named with its file and the newest one that verifies is taken instead.

Metrics go to the console (a tqdm bar on rank 0), ``metrics.jsonl``, TensorBoard, and a PNG
of the loss curves and gate values beside the checkpoints. Only rank 0 writes. A resumed run
rewrites ``metrics.jsonl`` to the history saved with its checkpoint (and TensorBoard purges the
later events), so the steps that ran after that checkpoint before a kill are not repeated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
log = logging.getLogger("flamingo.runs")


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
    ) -> Path | None:
        """``none``, ``auto`` (the newest complete checkpoint that verifies, or None when there
        is none at all) or an explicit checkpoint folder (which must verify).

        ``part`` and ``everywhere`` split the verification over ranks: ``everywhere(ok)`` is
        True when every rank's share verified (a collective), so all ranks pick the same one.
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
        found = self.complete()
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


class RunLogger:
    """Rank-0 metric sink: JSONL, TensorBoard, PNG plots."""

    def __init__(
        self,
        output_dir: Path,
        enabled: bool,
        tensorboard: bool,
        history: list[dict[str, Any]] | None = None,
        step: int = 0,
    ) -> None:
        """``history`` and ``step``: where a resumed run stands; the JSONL log is rewritten to
        that history (empty for a new run) and TensorBoard drops events after ``step``."""
        self.output_dir = output_dir
        self.enabled = enabled
        self.history: list[dict[str, Any]] = list(history or [])
        self.writer = None
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)
            path = output_dir / "metrics.jsonl"
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
            tmp.replace(path)
            self.jsonl = path.open("a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(
                    str(output_dir / "tensorboard"), purge_step=step + 1 if step else None
                )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        self.history.append(record)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def plot(self) -> Path | None:
        """Loss per dataset and |tanh(gate)| per layer over steps -> ``curves.png``."""
        if not self.enabled or not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.history]
        fig, (ax_loss, ax_gate) = plt.subplots(1, 2, figsize=(11, 4))
        for key in sorted({k for r in self.history for k in r if k.startswith("loss/")}):
            ax_loss.plot(steps, [r.get(key, float("nan")) for r in self.history], label=key[5:])
        ax_loss.set(xlabel="step", ylabel="NLL per target token", title="loss")
        ax_loss.legend()
        for key in sorted({k for r in self.history for k in r if k.startswith("gate/")}):
            ax_gate.plot(steps, [r.get(key, float("nan")) for r in self.history], label=key[5:])
        ax_gate.set(xlabel="step", ylabel="|tanh(gate)|", title="gates")
        ax_gate.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        path = self.output_dir / "curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()
