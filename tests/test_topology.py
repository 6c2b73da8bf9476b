"""CPU topology: CPU lists, reading fake sysfs/procfs trees (AMX, multi-node, cpuset-limited machines) and planning
the pinning on them. Applying a plan: test_pinning.py."""

import logging
import os

import pytest

from fake_topology import SPR_FLAGS, make_tree, x86_cpuinfo
from splitspec.topology import (
    PinningPlan,
    best_isa,
    format_cpu_list,
    inference_isa_flags,
    parse_cpu_list,
    plan_pinning,
    read_topology,
)


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
