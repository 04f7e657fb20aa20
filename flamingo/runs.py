"""Run directories: checkpoint bookkeeping and metric logging for ``train.py``.

Checkpoints live in ``OUTPUT/checkpoints/step-00000100/``. A checkpoint is written into
``step-00000100.tmp/``; once every rank has written its part, rank 0 adds a ``COMPLETE``
marker and renames the folder, so a kill at any moment leaves the previous complete
checkpoint untouched and ``--resume auto`` never picks a partial one.

Metrics go to the console (a tqdm bar on rank 0), ``metrics.jsonl``, TensorBoard, and a PNG
of the loss curves and gate values beside the checkpoints. Only rank 0 writes.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointDir:
    """Naming, completion, discovery and pruning of resumable checkpoints."""

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
        """(rank 0, after every rank wrote) Mark complete and move into place atomically."""
        tmp, final = self.tmp_path(step), self.final_path(step)
        (tmp / COMPLETE).write_text(f"{step}\n")
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

    def resolve(self, resume: str) -> Path | None:
        """``none``, ``auto`` (latest complete, or None) or an explicit checkpoint folder."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / COMPLETE).is_file():
            raise FileNotFoundError(
                f"--resume {resume}: not a complete checkpoint (no {COMPLETE} marker)"
            )
        return path


class RunLogger:
    """Rank-0 metric sink: JSONL, TensorBoard, PNG plots."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.output_dir = output_dir
        self.enabled = enabled
        self.history: list[dict[str, Any]] = []
        self.writer = None
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = (output_dir / "metrics.jsonl").open("a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(output_dir / "tensorboard"))

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
