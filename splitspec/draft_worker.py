"""The draft half of `splitspec.LLM`: a draft server in a pinned child process, or one served inside this process.

Either way the target reaches it through the draft protocol over a Unix domain socket, exactly as it reaches a
remote draft server; only the address differs.
"""

import contextlib
import functools
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitspec.topology import format_cpu_list

log = logging.getLogger(__name__)

# The package directory that holds draft_server, for a child started from a source checkout that is not installed.
_SOURCE_ROOT = pathlib.Path(__file__).resolve().parent.parent


def unix_socket_address(directory: str, name: str) -> str:
    return f"unix://{os.path.join(directory, name)}.sock"


class DraftWorkerProcess:
    """`python -m draft_server` as a child process, listening on a Unix socket in its own temporary directory.

    The child runs in its own session, so a Ctrl-C at the terminal reaches only this process, which then stops the
    child in order (`stop`); and it holds the read end of a pipe from this process, so it exits when this process
    dies in any way, a SIGKILL included (`--exit-when-stdin-closes`), and then removes the socket's directory
    (`--remove-when-stdin-closes`). Forks of this process (a multiprocessing or DataLoader worker) close their copy
    of the pipe's write end, which would otherwise keep the child serving after this process is killed.
    """

    def __init__(self, model: str, num_speculative_tokens: int, cpus: list[int] | None, numa_node: int | None):
        self.directory = tempfile.mkdtemp(prefix="splitspec-draft-")
        self.address = unix_socket_address(self.directory, "draft")
        command = [sys.executable, "-m", "draft_server", "--model", model, "--host", self.address,
                   "--max-num-speculative-tokens", str(num_speculative_tokens), "--exit-when-stdin-closes",
                   "--remove-when-stdin-closes", self.directory, "--log-level", "warning"]
        if cpus:
            command += ["--cpus", format_cpu_list(cpus)]
        if numa_node is not None:
            command += ["--numa-node", str(numa_node)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_SOURCE_ROOT), env.get("PYTHONPATH")]))
        self._command, self._env = command, env
        self.process = self._spawn()
        # A fork hook cannot be unregistered: it holds this object weakly and does nothing once it is gone.
        os.register_at_fork(after_in_child=functools.partial(_close_pipe_in_fork, weakref.ref(self)))
        log.info("draft worker pid %d starting on %s", self.process.pid, self.address)

    def _spawn(self) -> subprocess.Popen:
        # Output goes to this process's stdout/stderr: the draft logs only warnings and errors.
        return subprocess.Popen(self._command, stdin=subprocess.PIPE, env=self._env, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def exited(self) -> bool:
        return self.process.poll() is not None

    def restart(self) -> None:
        """Start the child again, on the same socket address, after it exited (killed for memory, say)."""
        if not self.exited():
            return
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        os.makedirs(self.directory, exist_ok=True)  # the child may have removed it on its way out
        self.process = self._spawn()
        log.warning("draft worker restarted as pid %d on %s", self.process.pid, self.address)

    def wait_until_serving(self, timeout_s: float) -> None:
        """Block until the child answers health checks; raises RuntimeError if it exits or times out first."""
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the draft worker exited with code {self.process.returncode} before serving "
                                       "(its log is on stderr)")
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass  # not listening yet
                time.sleep(0.1)
        raise RuntimeError(f"the draft worker did not serve on {self.address} within {timeout_s:.0f}s")

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM (the server's graceful shutdown), SIGKILL after `grace_s`; then remove the socket's directory."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(grace_s)
                except subprocess.TimeoutExpired:
                    log.warning("draft worker pid %d ignored SIGTERM for %.0fs: killing it", self.pid, grace_s)
                    self.process.kill()
                    self.process.wait()
            self.process.stdin.close()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def _close_pipe_in_fork(worker_ref: "weakref.ref[DraftWorkerProcess]") -> None:
    worker = worker_ref()
    if worker is not None:
        with contextlib.suppress(OSError):
            worker.process.stdin.close()


class InProcessDraft:
    """A DraftEngine and its DraftServicer on a Unix socket, served by the caller's event loop.

    Build it in any thread (that loads the model); call `start` and `stop` on the loop that serves it.
    """

    def __init__(self, model_id: str, device, dtype, num_speculative_tokens: int):
        import torch

        from draft_server.cli import build_parser
        from draft_server.engine import DraftEngine, DraftLimits
        from draft_server.servicer import DraftServerDescription
        from splitspec import models, topology
        from splitspec.server_cli import build_runner

        model = models.load_causal_lm(model_id, device, dtype)
        vocabulary = models.vocabulary_of(model, models.load_tokenizer(model_id, required=False))
        defaults = build_parser()  # the same limits as a draft server started with default flags
        limits = DraftLimits(
            max_num_speculative_tokens=num_speculative_tokens,
            max_context_tokens=models.max_context_tokens(model),
            max_draft_support=defaults.get_default("max_draft_support"),
            max_sessions=defaults.get_default("max_sessions"),
        )
        self.engine = DraftEngine(build_runner(model, log), vocabulary, limits,
                                  max_batch_size=defaults.get_default("max_num_seqs"),
                                  max_batch_tokens=defaults.get_default("max_num_batched_tokens"))
        flags = topology.read_topology().cpu_flags
        self.description = DraftServerDescription(
            model=model_id,
            dtype=str(dtype).removeprefix("torch."),
            backend="torch",
            isa=topology.best_isa(flags),
            isa_flags=topology.inference_isa_flags(flags),
            pinned_cpus=sorted(os.sched_getaffinity(0)),
            numa_node=None,
            threads=torch.get_num_threads(),
            pinning_notes=[f"in-process draft on {device}, sharing the target's process: not pinned"],
        )
        self.directory = tempfile.mkdtemp(prefix="splitspec-draft-")
        self.address = unix_socket_address(self.directory, "draft")
        self.server = None

    async def start(self) -> None:
        from draft_server.servicer import DraftServicer
        from splitspec.grpc_server import GrpcServer

        self.server = GrpcServer(self.address, 0)
        self.server.add_service("splitspec.v1.DraftService", DraftServicer(self.engine, self.description))
        await self.server.start()

    async def stop(self) -> None:
        try:
            if self.server is not None:
                await self.server.stop(grace_s=1.0)
        finally:
            self.engine.shutdown()
            shutil.rmtree(self.directory, ignore_errors=True)
