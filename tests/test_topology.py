"""CPU topology and pinning, on fake sysfs/procfs trees and affinities (AMX, multi-node, cpuset-limited machines) and
on this machine."""

import errno
import logging
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from splitspec.topology import (
    MPOL_BIND,
    CpuTopology,
    PinningPlan,
    apply_pinning,
    best_isa,
    format_cpu_list,
    inference_isa_flags,
    parse_cpu_list,
    plan_pinning,
    read_topology,
)

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


# --- CPU lists -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, cpus",
    [("0-3,8,10-11", [0, 1, 2, 3, 8, 10, 11]), ("5", [5]), ("", []), ("\n", []), (" 2-3 , 0 \n", [0, 2, 3])],
)
def test_parse_cpu_list(text, cpus):
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["a", "1,,2", "3-1", "-1", "1-", "0-3x", "1-2-3"])
def test_parse_cpu_list_rejects_garbage_naming_the_part(text):
    with pytest.raises(ValueError, match=r"invalid CPU list"):
        parse_cpu_list(text)


@pytest.mark.parametrize(
    "cpus, text",
    [([0, 1, 2, 3, 8], "0-3,8"), ([8, 0, 2, 1, 3], "0-3,8"), ([0, 2], "0,2"), ([1, 1, 2], "1-2"), ([], "")],
)
def test_format_cpu_list(cpus, text):
    assert format_cpu_list(cpus) == text
    assert parse_cpu_list(text) == sorted(set(cpus))


def test_format_cpu_list_rejects_negative_cpu():
    with pytest.raises(ValueError, match="non-negative"):
        format_cpu_list([-1, 0])


# --- reading the topology --------------------------------------------------------------------------------------------


def test_read_sapphire_rapids(sapphire_rapids):
    assert sapphire_rapids.online_cpus == tuple(range(16))
    assert sapphire_rapids.numa_nodes == {0: tuple(range(8)), 1: tuple(range(8, 16))}
    assert best_isa(sapphire_rapids.cpu_flags) == "amx"
    assert inference_isa_flags(sapphire_rapids.cpu_flags) == [
        "amx_bf16", "amx_int8", "amx_tile", "avx2", "avx512_bf16", "avx512_fp16", "avx512bw", "avx512f", "avx_vnni",
        "f16c", "fma",
    ]  # fmt: skip


def test_read_epyc_vm(epyc_vm):
    assert epyc_vm.online_cpus == (0, 1)
    assert epyc_vm.numa_nodes == {0: (0, 1)}
    assert best_isa(epyc_vm.cpu_flags) == "avx2"
    assert inference_isa_flags(epyc_vm.cpu_flags) == ["avx2", "f16c", "fma"]


def test_read_without_node_directory_is_one_node_of_all_cpus(no_numa):
    assert no_numa.numa_nodes == {0: (0, 1, 2, 3)}
    assert best_isa(no_numa.cpu_flags) == "avx512"


def test_read_arm_features(graviton):
    assert "sve" in graviton.cpu_flags
    assert best_isa(graviton.cpu_flags) == "baseline"
    assert inference_isa_flags(graviton.cpu_flags) == ["asimd", "asimddp", "asimdhp", "bf16", "i8mm", "sve", "sve2"]


def test_missing_cpuinfo_means_no_flags(tmp_path):
    sys_root, proc_root = make_tree(tmp_path, "0", {0: "0"}, "")
    (proc_root / "cpuinfo").unlink()
    assert read_topology(sys_root, proc_root).cpu_flags == frozenset()


@pytest.mark.parametrize(
    "flags, isa",
    [
        ({"amx_tile", "amx_int8", "avx512f"}, "amx"),
        ({"amx_tile", "avx512f"}, "avx512"),  # tiles without a compute extension are no use
        ({"amx_bf16", "avx512f"}, "avx512"),
        ({"avx2"}, "avx2"),
        (set(), "baseline"),
    ],
)
def test_best_isa(flags, isa):
    assert best_isa(flags) == isa


# --- planning --------------------------------------------------------------------------------------------------------


def test_plan_sapphire_rapids(sapphire_rapids):
    assert plan_pinning(sapphire_rapids, None, 1, None) == PinningPlan(tuple(range(8, 16)), 1, 8)
    assert plan_pinning(sapphire_rapids, [2, 3], None, None) == PinningPlan((2, 3), None, 2)
    assert plan_pinning(sapphire_rapids, [9, 8, 10], 1, 2) == PinningPlan((8, 9, 10), 1, 2)
    assert plan_pinning(sapphire_rapids, None, None, None) == PinningPlan(tuple(range(16)), None, 16)
    assert plan_pinning(sapphire_rapids, None, None, 4) == PinningPlan(tuple(range(16)), None, 4)


def test_plan_epyc_vm(epyc_vm):
    assert plan_pinning(epyc_vm, None, 0, None) == PinningPlan((0, 1), 0, 2)
    assert plan_pinning(epyc_vm, [1], 0, None) == PinningPlan((1,), 0, 1)
    assert plan_pinning(epyc_vm, None, None, 1) == PinningPlan((0, 1), None, 1)


def test_plan_without_node_directory(no_numa):
    assert plan_pinning(no_numa, None, 0, None) == PinningPlan((0, 1, 2, 3), 0, 4)
    assert plan_pinning(no_numa, [0, 1], None, 2) == PinningPlan((0, 1), None, 2)


def test_plan_arm(graviton):
    assert plan_pinning(graviton, None, 0, 3) == PinningPlan((0, 1, 2, 3), 0, 3)


@pytest.mark.parametrize(
    "cpus, node, threads, message",
    [
        (None, 5, None, r"--numa-node 5: no such NUMA node \(this machine has: 0, 1\)"),
        ([0, 16, 17], None, None, r"--cpus: CPU\(s\) 16-17 are not online \(online: 0-15\)"),
        ([], None, None, r"--cpus: the list is empty"),
        ([6, 7, 8, 9], 0, None, r"--cpus: CPU\(s\) 8-9 are not on --numa-node 0 \(its CPUs: 0-7\)"),
        (None, 1, 0, r"--threads 0: must be between 1 and 8"),
        (None, 1, 9, r"--threads 9: must be between 1 and 8, the number of pinned CPUs"),
        ([0, 1], None, 3, r"--threads 3: must be between 1 and 2"),
        (None, None, 17, r"--threads 17: must be between 1 and 16"),
    ],
)
def test_plan_errors_name_the_flag(sapphire_rapids, cpus, node, threads, message):
    with pytest.raises(ValueError, match=message):
        plan_pinning(sapphire_rapids, cpus, node, threads)


@pytest.mark.parametrize("fixture", ["epyc_vm", "no_numa", "graviton"])
def test_plan_unknown_node_lists_node_zero(request, fixture):
    with pytest.raises(ValueError, match=r"--numa-node 1: no such NUMA node \(this machine has: 0\)"):
        plan_pinning(request.getfixturevalue(fixture), None, 1, None)


def test_plan_uses_only_online_cpus_and_rejects_memory_only_node(tmp_path):
    # CPU 3 is offline; node 2 is memory only (CXL), its cpulist empty.
    tree = make_tree(tmp_path, "0-2,4-7", {0: "0-3", 1: "4-7", 2: ""}, x86_cpuinfo("avx2", 1))
    topology = read_topology(*tree, allowed_cpus=range(8))
    assert topology.numa_nodes[2] == ()
    assert plan_pinning(topology, None, 0, None).cpus == (0, 1, 2)
    with pytest.raises(ValueError, match=r"--numa-node 2: the node has no online CPUs"):
        plan_pinning(topology, None, 2, None)
    with pytest.raises(ValueError, match=r"--cpus: CPU\(s\) 3 are not online"):
        plan_pinning(topology, [3], 0, None)


AFFINITY = r"this process's affinity \(set by taskset, systemd's CPUAffinity= or a container's cpuset\)"


def test_plan_takes_only_the_cpus_the_process_may_run_on(tmp_path, caplog):
    # `taskset -c 2,3` on a 4-CPU machine: pinning must stay inside it, not widen it to all online CPUs.
    topology = read_topology(*make_tree(tmp_path, "0-3", {0: "0-3"}, x86_cpuinfo("avx2", 4)), allowed_cpus={3, 2})
    assert topology.online_cpus == (0, 1, 2, 3) and topology.allowed_cpus == (2, 3)
    with caplog.at_level(logging.INFO, logger="splitspec.topology"):
        assert plan_pinning(topology, None, None, None) == PinningPlan((2, 3), None, 2)
    assert [r.getMessage() for r in caplog.records] == [
        "pinning: the online CPUs 0-3 narrowed to 2-3, the ones allowed by this process's affinity "
        "(set by taskset, systemd's CPUAffinity= or a container's cpuset)"
    ]
    assert plan_pinning(topology, None, 0, None) == PinningPlan((2, 3), 0, 2)
    assert plan_pinning(topology, [3], None, None) == PinningPlan((3,), None, 1)
    with pytest.raises(ValueError, match=r"--threads 3: must be between 1 and 2, the number of pinned CPUs"):
        plan_pinning(topology, None, None, 3)


def test_plan_in_a_container_with_a_cpuset(tmp_path):
    # `docker run --cpuset-cpus 0-3` on a 64-CPU, 2-node host: sysfs shows the host, the affinity the cpuset.
    tree = make_tree(tmp_path, "0-63", {0: "0-31", 1: "32-63"}, x86_cpuinfo("avx2", 64))
    topology = read_topology(*tree, allowed_cpus=range(4))
    assert plan_pinning(topology, None, None, None) == PinningPlan((0, 1, 2, 3), None, 4)
    assert plan_pinning(topology, None, 0, None) == PinningPlan((0, 1, 2, 3), 0, 4)
    with pytest.raises(ValueError, match=rf"--cpus: CPU\(s\) 4-15 are not allowed by {AFFINITY}, which allows 0-3"):
        plan_pinning(topology, list(range(16)), None, None)
    with pytest.raises(ValueError, match=r"--threads 64: must be between 1 and 4"):
        plan_pinning(topology, None, None, 64)


def test_plan_with_the_affinity_inside_the_second_node(tmp_path, caplog):
    # systemd's CPUAffinity= for node 1, or a cpuset of part of it: 12-13 of node 1's 8-15.
    tree = make_tree(tmp_path, "0-15", {0: "0-7", 1: "8-15"}, x86_cpuinfo(SPR_FLAGS, 16))
    topology = read_topology(*tree, allowed_cpus=[12, 13])
    with caplog.at_level(logging.INFO, logger="splitspec.topology"):
        assert plan_pinning(topology, None, 1, None) == PinningPlan((12, 13), 1, 2)
    assert "pinning: NUMA node 1's online CPUs 8-15 narrowed to 12-13" in caplog.records[0].getMessage()
    assert plan_pinning(topology, None, None, None) == PinningPlan((12, 13), None, 2)
    assert plan_pinning(topology, [13], 1, None) == PinningPlan((13,), 1, 1)
    with pytest.raises(
        ValueError,
        match=rf"--numa-node 0: none of its online CPUs \(0-7\) is allowed by {AFFINITY}, which allows 12-13: "
        r"pick a node that holds some of those",
    ):
        plan_pinning(topology, None, 0, None)
    with pytest.raises(ValueError, match=rf"--cpus: CPU\(s\) 8-11 are not allowed by {AFFINITY}, which allows 12-13"):
        plan_pinning(topology, [8, 9, 10, 11, 12], 1, None)


def test_plan_refuses_an_affinity_of_no_online_cpu(tmp_path):
    topology = read_topology(*make_tree(tmp_path, "0-3", {0: "0-3"}, x86_cpuinfo("avx2", 4)), allowed_cpus=[4, 5])
    message = rf"none of the online CPUs \(0-3\) is allowed by {AFFINITY}, which allows 4-5"
    with pytest.raises(ValueError, match=message):
        plan_pinning(topology, None, None, None)


def test_read_topology_defaults_to_this_process_affinity(tmp_path):
    topology = read_topology(*make_tree(tmp_path, "0-255", {0: "0-255"}, x86_cpuinfo("avx2", 1)))
    assert topology.allowed_cpus == tuple(sorted(os.sched_getaffinity(0)))


# --- applying --------------------------------------------------------------------------------------------------------


class Recorder:
    def __init__(
        self,
        bind_error: OSError | None = None,
        affinity_error: OSError | None = None,
        affinity: set[int] = frozenset(range(16)),
    ):
        self.calls: list[tuple] = []
        self.bind_error, self.affinity_error, self.affinity = bind_error, affinity_error, affinity

    def set_affinity(self, pid, cpus):
        self.calls.append(("affinity", pid, tuple(cpus)))
        if self.affinity_error:
            raise self.affinity_error

    def get_affinity(self, pid):
        return self.affinity

    def bind_memory(self, node):
        self.calls.append(("bind", node))
        if self.bind_error:
            raise self.bind_error

    def set_threads(self, threads):
        self.calls.append(("threads", threads))

    def apply(self, plan):
        return apply_pinning(
            plan,
            set_affinity=self.set_affinity,
            get_affinity=self.get_affinity,
            bind_memory=self.bind_memory,
            set_threads=self.set_threads,
        )


@pytest.fixture(autouse=True)
def restore_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "untouched")


def test_apply_pins_cpus_memory_and_threads(sapphire_rapids):
    recorder = Recorder()
    applied = recorder.apply(plan_pinning(sapphire_rapids, None, 1, 4))
    assert recorder.calls == [("affinity", 0, tuple(range(8, 16))), ("bind", 1), ("threads", 4)]
    assert (applied.cpus, applied.numa_node, applied.threads, applied.notes) == (tuple(range(8, 16)), 1, 4, [])
    assert os.environ["OMP_NUM_THREADS"] == "4"


def test_apply_without_node_leaves_memory_policy_alone(epyc_vm):
    recorder = Recorder()
    applied = recorder.apply(plan_pinning(epyc_vm, [1], None, None))
    assert recorder.calls == [("affinity", 0, (1,)), ("threads", 1)]
    assert applied.numa_node is None and applied.notes == []


@pytest.mark.parametrize(
    "error, reason",
    [
        (PermissionError(errno.EPERM, "Operation not permitted"), "Operation not permitted"),
        (OSError(errno.ENOSYS, "Function not implemented"), "Function not implemented"),
        (OSError(errno.EINVAL, "Invalid argument"), "Invalid argument"),  # a node the kernel does not have
    ],
)
def test_apply_records_failed_memory_binding(sapphire_rapids, caplog, error, reason):
    recorder = Recorder(bind_error=error)
    with caplog.at_level(logging.WARNING, logger="splitspec.topology"):
        applied = recorder.apply(plan_pinning(sapphire_rapids, None, 1, None))
    assert applied.numa_node is None
    assert applied.cpus == tuple(range(8, 16)) and applied.threads == 8
    assert len(applied.notes) == 1 and "NUMA node 1 not applied" in applied.notes[0] and reason in applied.notes[0]
    assert ("threads", 8) in recorder.calls  # the rest is still applied
    assert [r.levelno for r in caplog.records] == [logging.WARNING] and reason in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    "cpus, threads, affinity, applied_threads",
    [
        (None, None, {8, 9}, 2),  # one thread per planned CPU: one per CPU it falls back to, fewer
        ([4, 5], None, set(range(16)), 16),  # ... or more
        (None, 4, {8, 9}, 2),  # an explicit count the fallback CPUs cannot hold: one per CPU
        ([4, 5], 1, set(range(16)), 1),  # an explicit count they can: kept
    ],
)
def test_apply_failed_affinity_runs_threads_on_the_cpus_it_has(
    sapphire_rapids, caplog, cpus, threads, affinity, applied_threads
):
    recorder = Recorder(affinity_error=PermissionError(errno.EPERM, "Operation not permitted"), affinity=affinity)
    plan = plan_pinning(sapphire_rapids, cpus, 0 if cpus else 1, threads)
    with caplog.at_level(logging.WARNING, logger="splitspec.topology"):
        applied = recorder.apply(plan)
    assert applied.cpus == tuple(sorted(affinity))
    assert applied.numa_node == plan.numa_node and applied.threads == applied_threads
    assert recorder.calls[-1] == ("threads", applied_threads)
    assert os.environ["OMP_NUM_THREADS"] == str(applied_threads)
    assert applied.notes == [
        f"CPU affinity {format_cpu_list(plan.cpus)} not applied ([Errno 1] Operation not permitted); "
        f"running on {format_cpu_list(affinity)} with {applied_threads} threads"
    ]
    assert caplog.records[0].getMessage() == f"pinning: {applied.notes[0]}"


# --- this machine, in a subprocess so the test process keeps its own affinity and policy -----------------------------


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="no mempolicy syscall numbers here")
def test_bind_memory_to_node_zero_on_this_machine():
    result = run_python(
        """
        import errno
        from splitspec.topology import bind_memory_to_node, current_memory_policy
        try:
            bind_memory_to_node(0)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOSYS):
                print("SKIP", exc)
                raise SystemExit
            raise
        print(current_memory_policy())
        """
    )
    assert result.returncode == 0, result.stderr
    if result.stdout.startswith("SKIP"):
        pytest.skip(f"set_mempolicy not permitted in this sandbox: {result.stdout.strip()}")
    assert result.stdout.strip() == f"({MPOL_BIND}, [0])"


def test_apply_pinning_on_this_machine_with_real_setters():
    result = run_python(
        """
        import os, torch
        from splitspec.topology import apply_pinning, plan_pinning, read_topology
        topology = read_topology()
        applied = apply_pinning(plan_pinning(topology, topology.allowed_cpus[-1:], None, 1))
        print(applied.cpus, sorted(os.sched_getaffinity(0)), torch.get_num_threads(), os.environ["OMP_NUM_THREADS"])
        """
    )
    assert result.returncode == 0, result.stderr
    last = read_topology().allowed_cpus[-1]
    assert result.stdout.split("\n")[0] == f"({last},) [{last}] 1 1"


needs_two_cpus = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="narrowing the affinity needs two CPUs to run on"
)


@needs_two_cpus
def test_pinning_stays_inside_an_inherited_affinity_on_this_machine():
    # What `taskset -c <last CPU>` does: the default plan pins to that CPU alone, with one thread.
    result = run_python(
        """
        import os, torch
        from splitspec.topology import apply_pinning, plan_pinning, read_topology
        last = max(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {last})
        applied = apply_pinning(plan_pinning(read_topology(), None, None, None))
        print(last, applied.cpus, sorted(os.sched_getaffinity(0)), torch.get_num_threads(), applied.threads)
        """
    )
    assert result.returncode == 0, result.stderr
    last = max(os.sched_getaffinity(0))
    assert result.stdout.split("\n")[0] == f"{last} ({last},) [{last}] 1 1"


@needs_two_cpus
def test_draft_server_refuses_cpus_outside_its_affinity(tmp_path):
    first, last = min(os.sched_getaffinity(0)), max(os.sched_getaffinity(0))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    completed = subprocess.run(
        [sys.executable, "-m", "draft_server", "--model", str(tmp_path / "never-loaded"), "--cpus", str(first)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        preexec_fn=lambda: os.sched_setaffinity(0, {last}),  # as `taskset -c <last>` would start it
    )
    assert completed.returncode == 2
    assert (
        f"splitspec-draft: error: --cpus: CPU(s) {first} are not allowed by this process's affinity "
        f"(set by taskset, systemd's CPUAffinity= or a container's cpuset), which allows {last}"
    ) in completed.stderr
