"""What ran at PyTorch's dispatcher during a step: value reads (host syncs) and attention kernels.

:class:`SyncCounter` counts every op that hands a tensor value to the host
(``_local_scalar_dense``: ``float()``, ``int()``, ``bool()``, ``.item()``) and every op whose
output shape depends on tensor values (``nonzero``, ``masked_select``, indexing with a boolean
mask): on an accelerator each stalls the host until the device has caught up.
:class:`KernelRecorder` records which attention kernel each call site's SDPA picked. Both name
the innermost frame of the project, transformers or open_clip that made the call.
``tests/test_syncs.py`` and ``bench/gpu.py`` use them.
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
VALUE_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "item"}
ATTENTION_OPS = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
    "_flash_attention_forward",
    "_efficient_attention_forward",
    "_native_multi_head_attention",
    "_scaled_dot_product_attention_math",
    "_softmax",
    "flex_attention",
)
"""Forward ops that tell how attention was computed (``_softmax``: an eager attention or a
math fallback; SDPA's own CPU kernel is ``_scaled_dot_product_flash_attention_for_cpu``)."""


def caller(skip: tuple[str, ...] = ()) -> str:
    """The innermost frame of transformers, open_clip or this project (outside the venv and
    this file, and the files named by ``skip``)."""
    skip = ("bench/dispatch.py", *skip)
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename
        for package in ("transformers/", "open_clip/"):
            if package in path:
                return package + path.split(package, 1)[1]
        if str(ROOT) in path and "/.venv" not in path and not any(s in path for s in skip):
            return f"{path.removeprefix(str(ROOT) + '/')}:{frame.lineno}"
    return "torch (autograd or optimiser)"


class SyncCounter(TorchDispatchMode):
    """Counts the value-reading ops by the innermost project or transformers frame."""

    def __init__(self, skip: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.skip = skip
        self.found: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        boolean_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())
        )
        if name in VALUE_OPS or boolean_index:
            self.found[(name, caller(self.skip))] += 1
        return func(*args, **(kwargs or {}))


class KernelRecorder(TorchDispatchMode):
    """Counts the attention kernels that ran, by call site: ``{"site": {"kernel": n}}``."""

    def __init__(self) -> None:
        super().__init__()
        self.found: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name.startswith(ATTENTION_OPS) and "backward" not in name:
            self.found[(caller(), name)] += 1
        return func(*args, **(kwargs or {}))

    def by_site(self) -> dict[str, dict[str, int]]:
        sites: dict[str, dict[str, int]] = {}
        for (site, kernel), count in sorted(self.found.items()):
            sites.setdefault(site, {})[kernel] = count
        return sites
