"""Metric logging of a training run (rank 0): the console bar's companion files.

``metrics.jsonl``, TensorBoard and ``curves.png`` (loss per dataset, ``|tanh(gate)|`` per layer)
beside the checkpoints. A resumed run rewrites ``metrics.jsonl`` to the history saved with its
checkpoint (and TensorBoard purges the later events), so the steps that ran after that
checkpoint before a kill are not repeated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class RunLogger:
    """Rank-0 metric sink: JSONL, TensorBoard, PNG plots."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.output_dir = output_dir
        self.enabled = enabled
        self.tensorboard = tensorboard
        self.history: list[dict[str, Any]] = []
        self.writer = None
        self.jsonl = None

    def start(self, history: list[dict[str, Any]] | None = None, step: int = 0) -> None:
        """Open the log where the run stands (``history`` and ``step`` of a resumed run): the
        JSONL log is rewritten to that history (empty for a new run) and TensorBoard drops
        events after ``step``."""
        self.history = list(history or [])
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / "metrics.jsonl"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        tmp.replace(path)
        self.jsonl = path.open("a")
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                str(self.output_dir / "tensorboard"), purge_step=step + 1 if step else None
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
        """Loss per dataset and |tanh(gate)| per layer (if any) over steps -> ``curves.png``."""
        if not self.enabled or not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.history]
        gates = sorted({k for r in self.history for k in r if k.startswith("gate/")})
        # a panel for the gates when the model has them (the LLaVA connector has none)
        fig, axes = plt.subplots(1, 2 if gates else 1, figsize=(11 if gates else 6, 4))
        ax_loss = axes[0] if gates else axes
        for key in sorted({k for r in self.history for k in r if k.startswith("loss/")}):
            ax_loss.plot(steps, [r.get(key, float("nan")) for r in self.history], label=key[5:])
        ax_loss.set(xlabel="step", ylabel="NLL per target token", title="loss")
        ax_loss.legend()
        if gates:
            for key in gates:
                axes[1].plot(steps, [r.get(key, float("nan")) for r in self.history], label=key[5:])
            axes[1].set(xlabel="step", ylabel="|tanh(gate)|", title="gates")
            axes[1].legend(fontsize=6, ncol=2)
        fig.tight_layout()
        path = self.output_dir / "curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()
