"""Fake sysfs/procfs trees for the topology and pinning tests: the few files `read_topology` reads, and CPU flag
lines of the machines the tests stand in for (AMX Xeon, this project's AVX2 EPYC VM, Graviton)."""

from pathlib import Path

import pytest

from splitspec.topology import CpuTopology, read_topology

SPR_FLAGS = "fpu sse avx avx2 fma f16c avx512f avx512bw avx512_bf16 avx512_fp16 avx_vnni amx_bf16 amx_tile amx_int8"
EPYC_FLAGS = "fpu sse sse2 ssse3 avx f16c fma avx2 bmi2 sha_ni"
ARM_FEATURES = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimddp sve sve2 bf16 i8mm"


def make_tree(root: Path, online: str, nodes: dict[int, str] | None, cpuinfo: str) -> tuple[Path, Path]:
    """Write the few sysfs/procfs files read_topology reads; nodes=None leaves out the node directory."""
    sys_root, proc_root = root / "sys", root / "proc"
    (sys_root / "devices/system/cpu").mkdir(parents=True)
    (sys_root / "devices/system/cpu/online").write_text(online + "\n")
    for node, cpulist in (nodes or {}).items():
        node_dir = sys_root / f"devices/system/node/node{node}"
        node_dir.mkdir(parents=True)
        (node_dir / "cpulist").write_text(cpulist + "\n")
    if nodes is not None:  # files beside the node dirs that must not be mistaken for nodes
        (sys_root / "devices/system/node/online").write_text(",".join(map(str, nodes)) + "\n")
        (sys_root / "devices/system/node/possible").write_text("0\n")
    proc_root.mkdir()
    (proc_root / "cpuinfo").write_text(cpuinfo)
    return sys_root, proc_root


def x86_cpuinfo(flags: str, cpus: int) -> str:
    # Only the first processor's flags count; a later differing line proves it.
    return "\n".join(
        f"processor\t: {cpu}\nmodel name\t: Fake CPU\nflags\t\t: {flags if cpu == 0 else 'fpu'}\n"
        for cpu in range(cpus)
    )


# Fixtures (conftest.py makes them visible to every test module).
@pytest.fixture
def sapphire_rapids(tmp_path) -> CpuTopology:
    """2 sockets, 8 CPUs each, AMX."""
    return read_topology(
        *make_tree(tmp_path, "0-15", {0: "0-7", 1: "8-15"}, x86_cpuinfo(SPR_FLAGS, 16)), allowed_cpus=range(16)
    )


@pytest.fixture
def epyc_vm(tmp_path) -> CpuTopology:
    """This project's kind of machine: 2 cores, AVX2, one node."""
    return read_topology(*make_tree(tmp_path, "0-1", {0: "0-1"}, x86_cpuinfo(EPYC_FLAGS, 2)), allowed_cpus=[0, 1])


@pytest.fixture
def no_numa(tmp_path) -> CpuTopology:
    """A kernel without CONFIG_NUMA: no node directory at all."""
    return read_topology(*make_tree(tmp_path, "0-3", None, x86_cpuinfo("avx2 avx512f fma", 4)), allowed_cpus=range(4))


@pytest.fixture
def graviton(tmp_path) -> CpuTopology:
    cpuinfo = f"processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: {ARM_FEATURES}\nCPU implementer\t: 0x41\n"
    return read_topology(*make_tree(tmp_path, "0-3", {0: "0-3"}, cpuinfo), allowed_cpus=range(4))
