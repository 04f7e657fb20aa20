"""CPU tensor memory from the profiler's allocation events, free of malloc's heap behaviour.

Peak RSS also counts memory that malloc keeps after tensors are freed and its fragmentation,
which can move the figure by hundreds of MiB between identical runs. The profiler, with
``profile_memory=True``, reports every CPU tensor allocation and free (``ptr``, signed size);
summing those of tensors allocated inside the profiled region gives the memory the region
asked the allocator for, over time: the CPU analogue of CUDA's max allocated.
"""

from __future__ import annotations

import gc
import warnings

import torch


def live_tensor_mib() -> float:
    """Memory of every CPU tensor storage Python can reach (weights, optimiser state, batch)."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance() on deprecated module proxies warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for tensor in tensors:
        if tensor.device.type == "cpu":
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) / 2**20


def allocated_bytes(prof) -> tuple[int, int]:
    """``(peak, retained)``: the most bytes that CPU tensors allocated inside the profiled
    region held at once, and those still held at its end. Frees of tensors allocated before
    the region do not count (their sizes may be unknown to the profiler)."""
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            fields = event.extra_fields
            events.append((event.start_time_ns, fields.alloc_size, fields.ptr))
        stack.extend(event.children)
    live: dict[int, int] = {}
    held = peak = 0
    for _, size, ptr in sorted(events, key=lambda e: e[0]):
        if size > 0:
            live[ptr] = size
            held += size
            peak = max(peak, held)
        elif ptr in live:
            held -= live.pop(ptr)
    return peak, held
