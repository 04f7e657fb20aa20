"""Metric logging of a training run (rank 0): the console bar's companion files.

``metrics.jsonl``, TensorBoard and ``curves.png`` (loss per dataset, the weighted total, ``|tanh(gate)|`` per layer)
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
        """The curves of the run so far -> ``curves.png`` (:func:`curves_figure`)."""
        if not self.enabled or not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = curves_figure(self.history)
        path = self.output_dir / "curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()


OBJECTIVES = ("itc", "itm", "itg")
"""BLIP-2 stage 1's losses (contrastive, matching, generation; ``stage1.LOSSES``), logged as
``itc/<dataset>`` and so on."""


def curves_figure(history: list[dict[str, Any]]) -> Any:
    """Each dataset's loss on one panel (each stage-1 objective its own curve: their sum is no
    NLL), the weighted total on its own (it sums weighted losses, a scale of its own), and
    ``|tanh(gate)|`` per layer when the model has gates."""
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    keys = sorted({k for r in history for k in r})
    objectives = [k for k in keys if k.split("/")[0] in OBJECTIVES]
    per_dataset = objectives or [k for k in keys if k.startswith("loss/") and k != "loss/total"]
    gates = [k for k in keys if k.startswith("gate/")]
    panels = 2 + bool(gates)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))

    def curve(ax: Any, key: str, label: str) -> None:
        ax.plot(steps, [r.get(key, float("nan")) for r in history], label=label)

    for key in per_dataset:
        name, dataset = key.split("/", 1)
        curve(axes[0], key, f"{name} ({dataset})" if objectives else dataset)
    ylabel = "loss per objective" if objectives else "NLL per target token"
    axes[0].set(xlabel="step", ylabel=ylabel, title="each dataset")
    axes[0].legend(fontsize=7)
    curve(axes[1], "loss/total", "total")
    axes[1].set(xlabel="step", ylabel="sum of loss_weight x loss", title="weighted total")
    if gates:
        for key in gates:
            curve(axes[2], key, key[5:])
        axes[2].set(xlabel="step", ylabel="|tanh(gate)|", title="gates")
        axes[2].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig
