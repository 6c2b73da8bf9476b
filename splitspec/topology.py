"""CPU topology and pinning for the draft server: which CPUs and NUMA nodes exist, which ISA they offer, and how
to pin this process to a set of them (the `numactl -C <cpus> -m <node>` + `OMP_NUM_THREADS` recipe, done in-process).

Everything is read from sysfs/procfs under roots the caller can replace, and the CPUs this process may run on
(its affinity) can be passed in, so tests run on fake machines. torch is imported only when threads are actually set,
so planning and inspection stay cheap.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


def parse_cpu_list(text: str) -> list[int]:
    """Parse the kernel's list format ("0-3,8,10-11") into sorted, unique CPU ids. An empty list is valid: the kernel
    writes one for a memory-only NUMA node."""
    cpus: set[int] = set()
    stripped = text.strip()
    for part in stripped.split(",") if stripped else []:
        first, sep, last = part.strip().partition("-")
        try:
            low, high = int(first), int(last if sep else first)
        except ValueError:
            raise ValueError(f"invalid CPU list {text!r}: {part!r} is not a CPU number or a range like 0-3") from None
        if low < 0 or high < low:
            raise ValueError(f"invalid CPU list {text!r}: {part!r} is not a range of non-negative CPUs, low to high")
        cpus.update(range(low, high + 1))
    return sorted(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """The inverse of `parse_cpu_list`: [0, 1, 2, 3, 8] -> "0-3,8"."""
    ordered = sorted(set(cpus))
    if ordered and ordered[0] < 0:
        raise ValueError(f"invalid CPU {ordered[0]}: CPU ids are non-negative")
    runs: list[list[int]] = []
    for cpu in ordered:
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in runs)


@dataclass(frozen=True)
class CpuTopology:
    online_cpus: tuple[int, ...]
    # The CPUs this process may run on, as inherited from taskset, systemd's CPUAffinity= or a container's cpuset:
    # pinning chooses among these only, since widening the set would escape the limit someone set on purpose.
    allowed_cpus: tuple[int, ...]
    numa_nodes: dict[int, tuple[int, ...]]  # node id -> its CPUs as sysfs lists them (possibly offline, possibly none)
    cpu_flags: frozenset[str]


def read_topology(
    sys_root: Path = Path("/sys"), proc_root: Path = Path("/proc"), allowed_cpus: Iterable[int] | None = None
) -> CpuTopology:
    """The machine as this process sees it; `allowed_cpus` defaults to this process's affinity."""
    online = tuple(parse_cpu_list((sys_root / "devices/system/cpu/online").read_text()))
    allowed = tuple(sorted(set(os.sched_getaffinity(0) if allowed_cpus is None else allowed_cpus)))
    nodes = {
        int(node_dir.name[len("node"):]): tuple(parse_cpu_list((node_dir / "cpulist").read_text()))
        for node_dir in (sys_root / "devices/system/node").glob("node[0-9]*")
        if (node_dir / "cpulist").is_file()
    }
    # Kernels built without CONFIG_NUMA (and some containers) have no node directory: that is one node holding all.
    return CpuTopology(
        online, allowed, dict(sorted(nodes.items())) or {0: online}, _read_cpu_flags(proc_root / "cpuinfo")
    )


def _read_cpu_flags(cpuinfo: Path) -> frozenset[str]:
    # Flags only choose defaults (dtype, log lines); a missing cpuinfo must not stop the server.
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return frozenset()
    for line in lines:
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):  # x86 / arm
            return frozenset(value.split())
    return frozenset()


def best_isa(flags: Iterable[str]) -> str:
    """The widest matrix ISA: "amx", "avx512", "avx2" or "baseline"."""
    flags = set(flags)
    if "amx_tile" in flags and flags & {"amx_bf16", "amx_int8"}:
        return "amx"
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "baseline"


_INFERENCE_PREFIXES = ("amx_", "avx512", "avx_vnni", "sve", "sme")
_INFERENCE_FLAGS = {"avx2", "fma", "f16c", "avx_ne_convert", "asimd", "asimddp", "asimdhp", "bf16", "i8mm"}


def inference_isa_flags(flags: Iterable[str]) -> list[str]:
    """The flags that decide matmul speed, sorted: what is worth a log line out of the ~150 in cpuinfo."""
    return sorted(f for f in set(flags) if f in _INFERENCE_FLAGS or f.startswith(_INFERENCE_PREFIXES))


@dataclass(frozen=True)
class PinningPlan:
    cpus: tuple[int, ...]
    numa_node: int | None  # memory is bound to this node; None leaves the kernel's default policy
    threads: int  # torch intra-op threads


_AFFINITY = "this process's affinity (set by taskset, systemd's CPUAffinity= or a container's cpuset)"


def plan_pinning(
    topology: CpuTopology, cpus: list[int] | None, numa_node: int | None, threads: int | None
) -> PinningPlan:
    """Check the `--cpus` / `--numa-node` / `--threads` flags against the machine and settle what to pin to.

    Only CPUs both online and allowed (`topology.allowed_cpus`) are candidates: without `--cpus`, the plan takes those
    of `--numa-node`, else all of them, and `--threads` defaults to one per planned CPU. An explicit `--cpus` outside
    the allowed set, or a node none of whose CPUs are allowed, is an error rather than a silent widening."""
    online = set(topology.online_cpus)
    allowed = set(topology.allowed_cpus)
    if numa_node is not None and numa_node not in topology.numa_nodes:
        nodes = ", ".join(map(str, topology.numa_nodes))
        raise ValueError(f"--numa-node {numa_node}: no such NUMA node (this machine has: {nodes})")
    if cpus is not None:
        if not cpus:
            raise ValueError("--cpus: the list is empty; name at least one CPU, e.g. --cpus 0-3")
        offline = set(cpus) - online
        if offline:
            raise ValueError(
                f"--cpus: CPU(s) {format_cpu_list(offline)} are not online (online: {format_cpu_list(online)})"
            )
        forbidden = set(cpus) - allowed
        if forbidden:
            raise ValueError(
                f"--cpus: CPU(s) {format_cpu_list(forbidden)} are not allowed by {_AFFINITY}, "
                f"which allows {format_cpu_list(allowed)}"
            )
        if numa_node is not None:
            elsewhere = set(cpus) - set(topology.numa_nodes[numa_node])
            if elsewhere:
                raise ValueError(
                    f"--cpus: CPU(s) {format_cpu_list(elsewhere)} are not on --numa-node {numa_node} "
                    f"(its CPUs: {format_cpu_list(topology.numa_nodes[numa_node])})"
                )
        chosen = sorted(set(cpus))
    elif numa_node is not None:
        node_online = online & set(topology.numa_nodes[numa_node])
        if not node_online:
            raise ValueError(f"--numa-node {numa_node}: the node has no online CPUs (a memory-only node?)")
        chosen = sorted(node_online & allowed)
        if not chosen:
            raise ValueError(
                f"--numa-node {numa_node}: none of its online CPUs ({format_cpu_list(node_online)}) is allowed by "
                f"{_AFFINITY}, which allows {format_cpu_list(allowed)}: pick a node that holds some of those"
            )
        _log_narrowed(f"NUMA node {numa_node}'s online CPUs", node_online, chosen)
    else:
        chosen = sorted(online & allowed)
        if not chosen:
            raise ValueError(
                f"none of the online CPUs ({format_cpu_list(online)}) is allowed by {_AFFINITY}, "
                f"which allows {format_cpu_list(allowed)}"
            )
        _log_narrowed("the online CPUs", online, chosen)
    if threads is None:
        threads = len(chosen)
    if not 1 <= threads <= len(chosen):
        # More threads than CPUs only makes OpenMP threads preempt each other on a pinned set.
        raise ValueError(f"--threads {threads}: must be between 1 and {len(chosen)}, the number of pinned CPUs")
    return PinningPlan(tuple(chosen), numa_node, threads)


def _log_narrowed(what: str, candidates: set[int], chosen: list[int]) -> None:
    if len(chosen) < len(candidates):
        logger.info(
            "pinning: %s %s narrowed to %s, the ones allowed by %s",
            what, format_cpu_list(candidates), format_cpu_list(chosen), _AFFINITY,
        )


MPOL_DEFAULT = 0
MPOL_BIND = 2
# (set_mempolicy, get_mempolicy) syscall numbers: the raw syscall needs no libnuma, which images often lack.
_MEMPOLICY_SYSCALLS = {"x86_64": (238, 239), "aarch64": (237, 236)}
_MASK_WORDS = 16  # a 1024-node mask: above any real machine's node count
_MASK_BITS = _MASK_WORDS * ctypes.sizeof(ctypes.c_ulong) * 8


def _mempolicy_syscall(index: int, *args) -> None:
    numbers = _MEMPOLICY_SYSCALLS.get(platform.machine())
    if numbers is None:
        raise OSError(errno.ENOSYS, f"NUMA memory policy: no syscall number known for {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(ctypes.c_long(numbers[index]), *args) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{('set_mempolicy', 'get_mempolicy')[index]}: {os.strerror(code)}")


def bind_memory_to_node(node: int) -> None:
    """Allocate this process's memory only on `node` (MPOL_BIND), like `numactl -m <node>`."""
    if not 0 <= node < _MASK_BITS:
        raise ValueError(f"NUMA node {node} out of range 0..{_MASK_BITS - 1}")
    mask = (ctypes.c_ulong * _MASK_WORDS)()
    bits = ctypes.sizeof(ctypes.c_ulong) * 8
    mask[node // bits] = 1 << (node % bits)
    # The kernel reads maxnode - 1 bits (a historical off-by-one libnuma also compensates for).
    _mempolicy_syscall(0, ctypes.c_int(MPOL_BIND), mask, ctypes.c_ulong(_MASK_BITS + 1))


def current_memory_policy() -> tuple[int, list[int]]:
    """(mode, nodes) of this thread's memory policy, e.g. (MPOL_BIND, [0]) after `bind_memory_to_node(0)`."""
    mode = ctypes.c_int(-1)
    mask = (ctypes.c_ulong * _MASK_WORDS)()
    _mempolicy_syscall(1, ctypes.byref(mode), mask, ctypes.c_ulong(_MASK_BITS + 1), None, ctypes.c_ulong(0))
    bits = ctypes.sizeof(ctypes.c_ulong) * 8
    return mode.value, [n for n in range(_MASK_BITS) if mask[n // bits] >> (n % bits) & 1]


@dataclass
class AppliedPinning:
    """What actually took effect; `notes` says what could not be applied and why."""

    cpus: tuple[int, ...]
    numa_node: int | None
    threads: int
    notes: list[str]


def _torch_set_num_threads(threads: int) -> None:
    import torch  # lazily: planning and inspecting topology must not pay for importing torch

    torch.set_num_threads(threads)


def apply_pinning(
    plan: PinningPlan,
    *,
    set_affinity: Callable[[int, Iterable[int]], None] = os.sched_setaffinity,
    get_affinity: Callable[[int], Iterable[int]] = os.sched_getaffinity,
    bind_memory: Callable[[int], None] = bind_memory_to_node,
    set_threads: Callable[[int], None] | None = None,
) -> AppliedPinning:
    """Pin this process as planned. Affinity and memory policy are per thread and inherited by threads started later,
    so call this before torch or gRPC start their thread pools.

    A sandbox or container may forbid affinity or memory policy (EPERM, ENOSYS): that costs speed, not correctness,
    so it is logged and recorded in `notes` instead of stopping the server. Without the planned affinity the process
    runs on the CPUs it already had, and its threads follow them: one per CPU if the plan had one per CPU, else the
    plan's count where those CPUs hold it."""
    notes: list[str] = []
    cpus, threads = plan.cpus, plan.threads
    try:
        set_affinity(0, plan.cpus)
    except OSError as exc:
        cpus = tuple(sorted(get_affinity(0)))
        threads = len(cpus) if plan.threads == len(plan.cpus) else min(plan.threads, len(cpus))
        notes.append(
            f"CPU affinity {format_cpu_list(plan.cpus)} not applied ({exc}); "
            f"running on {format_cpu_list(cpus)} with {threads} threads"
        )
    numa_node = plan.numa_node
    if numa_node is not None:
        try:
            bind_memory(numa_node)
        except OSError as exc:
            numa_node = None
            notes.append(f"memory binding to NUMA node {plan.numa_node} not applied ({exc})")
    # OMP_NUM_THREADS only matters to OpenMP runtimes not yet started (child processes, late-loaded libraries);
    # the running torch pool is resized by set_num_threads.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    (set_threads or _torch_set_num_threads)(threads)
    for note in notes:
        logger.warning("pinning: %s", note)
    return AppliedPinning(cpus, numa_node, threads, notes)
