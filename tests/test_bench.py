"""The training-step benchmark runs both implementations and writes its record (tiny, 1 step).

Speed and memory are measured by ``python -m bench.train_step``, not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_train_step_bench_writes_ratios_and_a_profile(tmp_path):
    cmd = [sys.executable, "-m", "bench.train_step", "--config", "tiny", "--batch", "1"]
    cmd += ["--steps", "1", "--repeats", "1", "--profile", "3", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "train_step-tiny-cpu.json").read_text())
    for impl in ("ours", "openflamingo"):
        result = record["results"][impl]
        assert result["samples_per_s"] > 0 and result["peak_mib"] > 0
        assert len(result["top_ops"]) == 3 and all(op["ms"] >= 0 for op in result["top_ops"])
    assert record["ratios"]["samples_per_s"] > 0
    assert "| samples/s |" in done.stdout and "costliest ops" in done.stdout
