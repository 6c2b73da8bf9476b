"""Applying a pinning plan: CPU affinity, NUMA memory binding and thread counts, with recorded setters on fake
topologies (see fake_topology.py) and with the real setters on this machine."""

import errno
import logging
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from splitspec.topology import MPOL_BIND, apply_pinning, format_cpu_list, plan_pinning, read_topology


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
