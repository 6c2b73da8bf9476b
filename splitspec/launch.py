"""A draft server and a target server as two OS processes on loopback, each on its own CPUs: what the demo and
the benchmark run. Only the servers' command lines are used, as a user would start them."""

import concurrent.futures
import contextlib
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitspec.topology import format_cpu_list

LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


def split_cpus(cpus: list[int], target_on_gpu: bool = False) -> tuple[list[int], list[int]]:
    """(draft CPUs, target CPUs). A CPU target does the heavy forward passes: it gets three quarters, the draft at
    least one CPU. A GPU target needs a CPU to drive the GPU (its model worker) and, from 4 CPUs on, a second one
    for its event loop and gRPC, so that streaming and launching kernels do not take turns; the draft gets the
    others. With a single CPU both share it."""
    if len(cpus) < 2:
        return list(cpus), list(cpus)
    if target_on_gpu:
        num_draft = len(cpus) - (2 if len(cpus) >= 4 else 1)
    else:
        num_draft = max(1, len(cpus) // 4)
    return list(cpus[:num_draft]), list(cpus[num_draft:])


class ServerProcess:
    """`python -m <module> --host 127.0.0.1 --port 0 ...` with its output in `log_path`; `address` once it serves.

    The child runs in its own session: a Ctrl-C at the terminal reaches only the parent, which stops the child in
    order (SIGTERM, the servers' graceful shutdown) from its `finally`.
    """

    def __init__(self, module: str, args: list[str], log_path: pathlib.Path, cpus: list[int] | None = None,
                 startup_timeout_s: float = 120.0, threads: int | None = None,
                 health_credentials: grpc.ChannelCredentials | None = None):
        """`health_credentials`: for a server that serves TLS; its health is then checked at localhost:PORT, the
        name its certificate must carry."""
        self.module = module
        self.log_path = log_path
        self.health_credentials = health_credentials
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if threads or cpus:
            env["OMP_NUM_THREADS"] = str(threads or len(cpus))
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", "0", *args],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        if cpus:
            # Before the child imports torch, so every thread it starts inherits the mask.
            with contextlib.suppress(OSError):
                os.sched_setaffinity(self.process.pid, cpus)
        try:
            self.address = self._wait_serving(startup_timeout_s)
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        return self.log_path.read_text()

    def alive(self) -> bool:
        return self.process.poll() is None

    def _wait_serving(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log())
            if match:
                address = f"127.0.0.1:{match.group(1)}"
                if self.health_credentials is None:
                    channel = grpc.insecure_channel(address)
                else:
                    channel = grpc.secure_channel(f"localhost:{match.group(1)}", self.health_credentials)
                with channel:
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                return address
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.module} exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.1)
        raise TimeoutError(f"{self.module} did not start within {timeout_s}s:\n{self.log()}")

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def start_together(starts: dict, started: dict) -> None:
    """Run the `starts` (name: a function starting a server) side by side, as most of a start is waiting on imports;
    each server that comes up goes into `started` under its name (for the caller to stop, whatever happens), then the
    first start's error, if any, is raised."""
    with concurrent.futures.ThreadPoolExecutor(len(starts)) as pool:
        futures = {name: pool.submit(start) for name, start in starts.items()}
        for name, future in futures.items():
            with contextlib.suppress(Exception):  # raised below, once every started server is kept
                started[name] = future.result()
        for future in futures.values():
            future.result()


def stop_all(servers: list[ServerProcess]) -> None:
    """Stop `servers`, last started first. A second Ctrl-C meanwhile is ignored: it would leave one running."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for server in reversed(servers):
            server.stop()
    finally:
        signal.signal(signal.SIGINT, previous)


def start_draft(model_dir: str, cpus: list[int], log_dir: pathlib.Path, max_num_speculative_tokens: int = 16,
                name: str = "draft"):
    """The draft server pinned to `cpus` (it pins itself), one thread per CPU, float32 weights."""
    return ServerProcess("draft_server", ["--model", model_dir, "--cpus", format_cpu_list(cpus), "--dtype", "float32",
                                          "--max-num-speculative-tokens", str(max_num_speculative_tokens)],
                         log_dir / f"{name}.log")


def start_target(model_dir: str, draft_address: str, cpus: list[int], log_dir: pathlib.Path,
                 device: str = "cpu", max_num_speculative_tokens: int = 16, dtype: str = "auto",
                 extra_args: tuple[str, ...] = (), name: str = "target"):
    """The target server on `cpus` (pinned from here), verifying blocks from the draft at `draft_address`."""
    return ServerProcess("target_server", ["--model", model_dir, "--draft", draft_address, "--device", device,
                                           "--dtype", dtype, "--threads", str(len(cpus)),
                                           "--max-num-speculative-tokens", str(max_num_speculative_tokens),
                                           *extra_args],
                         log_dir / f"{name}.log", cpus=cpus)
