"""DeepSpeed's C++ ops that our runs load, built once per environment and never in silence.

On the CPU accelerator DeepSpeed compiles a shared-memory communication op at its first
``init_distributed``, and an offloaded optimiser compiles CPU Adam at its first step, each with
nothing printed (25-60 s on 2 cores; a launcher that sits silent for minutes looks hung). Two
things here keep that out of a run's way:

- :func:`load_ops` loads them before DeepSpeed asks, saying on the node's first rank what is
  being built, where, and how long it took. DeepSpeed keeps a loaded op per process, so its own
  later ``load()`` costs nothing.
- The compiler's target flags come from the machine's ``/proc/cpuinfo``, not from DeepSpeed's
  ``py-cpuinfo`` query, which starts two helper processes per op (one runs CPUID in a
  ``multiprocessing`` child) and is the one step of a build that can wait on something other
  than the compiler. The flags are the ones DeepSpeed would choose (``-march=native`` and the
  widest SIMD the CPU has), so a process that builds through DeepSpeed alone finds the same
  build. CPU Adam's own vendor query, when the optimiser is made, is answered the same way
  (:func:`pin_cpuinfo`).

``python -m flamingo.training.ops`` builds them ahead (``make install`` does), so neither the
first run nor the test suite compiles under a launcher's timeout.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

CPU_COMM = "ShareMemCommBuilder"
CPU_ADAM = "CPUAdamBuilder"


def cpu_flags(machine: str, cpuinfo: str) -> tuple[str, str]:
    """``(arch flag, SIMD define)`` for a CPU: what DeepSpeed's ``cpu_arch``/``simd_width``
    return for it, from ``platform.machine()`` and the text of ``/proc/cpuinfo``."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    if machine in ("x86_64", "AMD64", "i686", "i386"):
        if "avx512f" in flags:
            return "-march=native", "-D__AVX512__"
        return "-march=native", "-D__AVX256__" if "avx2" in flags else "-D__SCALAR__"
    if machine.startswith("ppc"):
        return "-mcpu=native", "-D__SCALAR__"
    if machine.startswith("riscv64"):
        return "-march=rv64gc", "-D__SCALAR__"
    if machine == "aarch64":
        return "-march=native", "-D__SVE__" if "sve" in flags else "-D__NEON__"
    return "-march=native", "-D__SCALAR__"


def pin_cpu_flags(builder: Any) -> None:
    """Give ``builder`` this machine's flags without a ``py-cpuinfo`` query (Linux only; other
    systems keep DeepSpeed's own detection)."""
    proc = Path("/proc/cpuinfo")
    if not proc.is_file():
        return
    arch, simd = cpu_flags(platform.machine(), proc.read_text(errors="replace"))
    builder.cpu_arch = lambda: arch
    builder.simd_width = lambda: simd


def extensions_dir() -> Path:
    """Where torch builds DeepSpeed's C++ ops: a folder of this environment's own. torch's
    default (``~/.cache/torch_extensions/py311_cpu``) is shared by every environment of one
    Python, so two venvs with other torch builds rebuild the op at each other's every launch."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path(sys.prefix) / "torch_extensions")


def import_deepspeed() -> Any:
    """``import deepspeed`` with its op builds kept in :func:`extensions_dir`."""
    os.environ["TORCH_EXTENSIONS_DIR"] = str(extensions_dir())
    import deepspeed

    return deepspeed


CPUINFO_ARCH = {"x86_64": "X86_64", "AMD64": "X86_64", "aarch64": "ARM_8", "ppc64le": "PPC_64"}
"""py-cpuinfo's ``arch`` for ``platform.machine()``."""


def linux_cpu_info(machine: str, cpuinfo: str) -> dict[str, Any]:
    """The fields of py-cpuinfo's ``get_cpu_info()`` that DeepSpeed reads (``vendor_id_raw``,
    ``arch``, ``flags``, ``brand_raw``), from ``platform.machine()`` and ``/proc/cpuinfo``."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = fields.get("flags") or fields.get("Features") or ""
    return {
        "vendor_id_raw": fields.get("vendor_id") or fields.get("CPU implementer", ""),
        "brand_raw": fields.get("model name", ""),
        "arch": CPUINFO_ARCH.get(machine, machine),
        "flags": sorted(flags.split()),
    }


def pin_cpuinfo() -> None:
    """Answer py-cpuinfo's ``get_cpu_info()`` from ``/proc/cpuinfo`` in this process: DeepSpeed's
    CPU Adam asks it for the CPU vendor every time one is made (to warn about fp16 on AMD),
    and each query starts helper processes, one running CPUID in a ``multiprocessing`` child,
    inside a launched rank. Linux only; elsewhere py-cpuinfo answers as before."""
    proc = Path("/proc/cpuinfo")
    if not proc.is_file():
        return
    import cpuinfo

    info = linux_cpu_info(platform.machine(), proc.read_text(errors="replace"))
    cpuinfo.get_cpu_info = lambda: dict(info)


def built(builder: Any) -> bool:
    """Whether the op's library already lies in its build folder (torch names the folder
    after the op; a rebuilt version is ``NAME_vN.so``)."""
    return any((extensions_dir() / builder.name).glob(f"{builder.name}*.so"))


def wanted(offload: bool) -> list[str]:
    """The ops a run on this machine's accelerator loads: the CPU accelerator's communication
    op, and CPU Adam when the optimiser is offloaded."""
    from deepspeed.accelerator import get_accelerator

    names = [CPU_COMM] if get_accelerator().device_name() == "cpu" else []
    return names + ([CPU_ADAM] if offload else [])


def load_ops(names: list[str], announce: bool) -> list[str]:
    """Load (building where needed) each named op; return the names of those built now. With
    ``announce`` the build is said before it starts and timed when it ends."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if CPU_ADAM in names:
        pin_cpuinfo()  # the optimiser asks it again when it is made
    made = []
    for name in names:
        builder = get_accelerator().create_op_builder(name)
        compatible = getattr(deepspeed.ops, "__compatible_ops__", {})
        if builder is None or not compatible.get(builder.NAME, True):
            continue  # DeepSpeed goes without it on this machine (it checks the same)
        pin_cpu_flags(builder)
        fresh = not built(builder)
        if fresh and announce:
            print(
                f"[flamingo] building DeepSpeed's {builder.name} op for this environment "
                f"(once; about a minute on 2 cores) in {extensions_dir() / builder.name}",
                file=sys.stderr,
                flush=True,
            )
        start = time.perf_counter()
        builder.load()
        if fresh:
            made.append(name)
            if announce:
                took = time.perf_counter() - start
                print(
                    f"[flamingo] {builder.name} built in {took:.0f} s", file=sys.stderr, flush=True
                )
    return made


def first_on_node() -> bool:
    """Whether this process speaks for its node: launched ranks read ``LOCAL_RANK``."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


SHM_DIR = Path("/dev/shm")


def shm_buffer(rank: int, env: dict[str, str] | None = None) -> Path:
    """The shared-memory segment DeepSpeed's CPU communication op creates for ``rank`` (its
    ``shm.cpp``: ``deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}``)."""
    env = os.environ if env is None else env
    addr, port = env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


DEPRECATED_GATHER = r"`torch\.distributed\.all_gather_into_tensor` is deprecated"
"""torch's warning at each of DeepSpeed's ZeRO gathers (the locked torch 2.14.1, DeepSpeed 0.19.8)."""


def init_distributed(deepspeed: Any, timeout: Any) -> None:
    """``deepspeed.init_distributed``, and this rank's shared-memory segment unlinked as soon
    as every rank has mapped it.

    On the CPU accelerator, with every rank on one machine (``LOCAL_SIZE`` equal to the world
    size: the ``deepspeed`` launcher's runs, one process included), DeepSpeed's communication
    op creates a 66 MB segment per rank in ``/dev/shm`` and never unlinks it: each run left
    its segments in memory after it ended (296 of them, 20 GB of a 24 GB machine's RAM, after
    some days of test runs here). Every rank maps every other rank's segment while
    ``init_distributed`` runs, so after a barrier the names can go: the memory stays mapped
    until the processes end, then the system frees it, even after a crash or a kill."""
    import torch.distributed as dist

    # DeepSpeed's ZeRO gathers call torch's deprecated all_gather_into_tensor: two lines of
    # FutureWarning in every rank's log at every step, about a call of DeepSpeed's, not ours
    warnings.filterwarnings("ignore", DEPRECATED_GATHER, FutureWarning)
    fresh = not (dist.is_available() and dist.is_initialized())
    deepspeed.init_distributed(timeout=timeout)
    if not fresh:
        return
    from deepspeed.accelerator import get_accelerator

    world = dist.get_world_size()
    if get_accelerator().device_name() != "cpu" or os.environ.get("LOCAL_SIZE") != str(world):
        return
    if world > 1:
        dist.barrier()
    shm_buffer(dist.get_rank()).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flamingo.training.ops",
        description="Build the DeepSpeed ops a run on this machine loads (the CPU accelerator's "
        "communication op; CPU Adam for an offloaded optimiser), so that no launched run "
        "compiles them. Safe to rerun: what is built is loaded, not rebuilt.",
    )
    parser.add_argument(
        "--no-offload", action="store_true", help="skip CPU Adam (only offload uses it)"
    )
    args = parser.parse_args(argv)
    import_deepspeed()
    names = wanted(offload=not args.no_offload)
    made = load_ops(names, announce=True)
    print(
        f"[flamingo] DeepSpeed ops ready: {', '.join(names) or 'none needed'} "
        f"({len(made)} built now)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
