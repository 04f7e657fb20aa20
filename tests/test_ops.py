"""DeepSpeed's C++ ops (flamingo/training/ops.py): built in this environment's own folder, with
the compiler flags DeepSpeed itself would choose, announced when a build happens."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flamingo.training import ops

X86_AVX512 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512bw\n"
X86_AVX2 = "flags\t\t: fpu sse2 avx avx2 fma\n"
X86_OLD = "flags\t\t: fpu sse2\n"
ARM_SVE = "Features\t: fp asimd sve\n"
ARM = "Features\t: fp asimd\n"

CPUS = [  # (platform.machine(), /proc/cpuinfo, py-cpuinfo's answer for the same CPU)
    ("x86_64", X86_AVX512, {"arch": "X86_64", "flags": ["avx2", "avx512bw", "avx512f", "sse2"]}),
    ("x86_64", X86_AVX2, {"arch": "X86_64", "flags": ["avx", "avx2", "fma", "sse2"]}),
    ("x86_64", X86_OLD, {"arch": "X86_64", "flags": ["fpu", "sse2"]}),
    ("aarch64", ARM_SVE, {"arch": "ARM_8", "flags": ["asimd", "fp", "sve"]}),
    ("aarch64", ARM, {"arch": "ARM_8", "flags": ["asimd", "fp"]}),
    ("ppc64le", "cpu\t\t: POWER9\n", {"arch": "PPC_64", "flags": []}),
]


def test_deepspeeds_op_builds_are_kept_in_this_environment(monkeypatch):
    # torch's default build folder is shared by every venv of one Python: another torch
    # rebuilt DeepSpeed's CPU communication op at each launch (~3 minutes)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert ops.extensions_dir() == Path(sys.prefix) / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/elsewhere")
    assert ops.extensions_dir() == Path("/elsewhere")  # a user's choice stays theirs


@pytest.mark.parametrize(
    ("machine", "text", "info"), CPUS, ids=[c[0] + str(i) for i, c in enumerate(CPUS)]
)
def test_the_pinned_flags_are_those_deepspeed_chooses(monkeypatch, machine, text, info):
    """Same flags, same build: a process that builds through DeepSpeed alone (py-cpuinfo)
    finds the library ours built instead of compiling a second version."""
    import cpuinfo
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(cpuinfo, "get_cpu_info", lambda: info)
    builder = get_accelerator().create_op_builder(ops.CPU_ADAM)
    assert ops.cpu_flags(machine, text) == (builder.cpu_arch(), builder.simd_width())


def test_a_pinned_builder_never_asks_py_cpuinfo(monkeypatch):
    """py-cpuinfo starts helper processes (CPUID in a multiprocessing child) for every query:
    the one step of a build that can wait on something other than the compiler."""
    import cpuinfo
    from deepspeed.accelerator import get_accelerator

    def refuse():
        raise AssertionError("py-cpuinfo was asked")

    monkeypatch.setattr(cpuinfo, "get_cpu_info", refuse)
    builder = get_accelerator().create_op_builder(ops.CPU_ADAM)
    ops.pin_cpu_flags(builder)
    args = builder.cxx_args()
    assert any(a.startswith(("-march=", "-mcpu=")) for a in args)
    assert any(a.startswith("-D__") for a in args)


class _Builder:
    """An op builder whose "build" writes its library, as torch's would."""

    NAME = name = "fake_op"

    def __init__(self, root: Path) -> None:
        self.root, self.loads = root, 0

    def load(self):
        self.loads += 1
        (self.root / self.name).mkdir(parents=True, exist_ok=True)
        (self.root / self.name / f"{self.name}.so").touch()


def test_a_build_is_announced_and_timed_once(monkeypatch, tmp_path, capsys):
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(deepspeed.ops, "__compatible_ops__", {"fake_op": True})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    fake = _Builder(tmp_path)
    monkeypatch.setattr(get_accelerator(), "create_op_builder", lambda name: fake)
    assert ops.load_ops(["Fake"], announce=True) == ["Fake"]
    err = capsys.readouterr().err
    assert "building DeepSpeed's fake_op op" in err and str(tmp_path / "fake_op") in err
    assert "fake_op built in" in err
    # built: loaded (DeepSpeed's own load() then costs nothing), said no more
    assert ops.load_ops(["Fake"], announce=True) == [] and fake.loads == 2
    assert capsys.readouterr().err == ""
    # the node's other ranks build (or wait for the build) without a word
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "other"))
    fake.root = tmp_path / "other"
    assert ops.load_ops(["Fake"], announce=False) == ["Fake"]
    assert capsys.readouterr().err == ""


def test_the_ops_a_run_loads_here(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert ops.first_on_node()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not ops.first_on_node()
    # this machine is CPU-only: DeepSpeed's CPU accelerator communicates through its own op
    assert ops.wanted(offload=False) == [ops.CPU_COMM]
    assert ops.wanted(offload=True) == [ops.CPU_COMM, ops.CPU_ADAM]


def test_the_command_loads_what_install_built(capsys):
    """``make install`` runs it: afterwards a rerun builds nothing."""
    assert ops.main([]) == 0
    assert "DeepSpeed ops ready: ShareMemCommBuilder, CPUAdamBuilder (0 built now)" in (
        capsys.readouterr().out
    )


def test_cpu_adams_vendor_query_starts_no_process(monkeypatch):
    """DeepSpeed's CPU Adam asks py-cpuinfo for the vendor whenever one is made; pinned, the
    answer comes from /proc/cpuinfo with no helper process (a launched rank's only other step
    that could wait on something other than the compiler or the network)."""
    import multiprocessing
    import platform
    import subprocess

    import cpuinfo

    monkeypatch.setattr(cpuinfo, "get_cpu_info", cpuinfo.get_cpu_info)  # restored after
    ops.pin_cpuinfo()

    def refuse(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(multiprocessing, "Process", refuse)
    info = cpuinfo.get_cpu_info()
    machine = platform.machine()
    assert info["arch"] == ops.CPUINFO_ARCH.get(machine, machine) and info["flags"]
    assert ops.linux_cpu_info("aarch64", ARM_SVE) == {
        "vendor_id_raw": "", "brand_raw": "", "arch": "ARM_8", "flags": ["asimd", "fp", "sve"]
    }  # fmt: skip
