"""``train.py`` as the cluster tests run it (tests/test_cluster.py), watched:

- every evaluation batch sleeps ``FLAMINGO_TEST_EVAL_SLEEP`` seconds, so an evaluation during
  training outlasts the process group's timeout;
- each rank writes ``FLAMINGO_TEST_RECORD/rank<R>.json``: how many tensors its export gather
  (``Engine.full_tensors`` of the exported names) left in its hands.

    torchrun --nproc_per_node 2 tests/cluster_train.py --config ... engine.timeout_minutes=0.15
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval.run  # noqa: E402
import train  # noqa: E402
from flamingo.training.engine import DeepSpeedEngine  # noqa: E402

_generate = eval.run.Evaluator._generate
_full_tensors = DeepSpeedEngine.full_tensors


def _slow(self, *args, **kwargs):
    time.sleep(float(os.environ.get("FLAMINGO_TEST_EVAL_SLEEP", "0")))
    return _generate(self, *args, **kwargs)


def _recorded(self, names):
    out = _full_tensors(self, names)
    if len(names) > 4:  # the export (the gates are gathered for the logs too)
        record = Path(os.environ["FLAMINGO_TEST_RECORD"]) / f"rank{self.rank}.json"
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"asked": len(names), "held": len(out)}))
    return out


eval.run.Evaluator._generate = _slow
DeepSpeedEngine.full_tensors = _recorded

if __name__ == "__main__":
    sys.exit(train.main())
