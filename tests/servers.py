"""Starting the real servers as OS processes on loopback, for integration tests."""

import atexit
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


_LIVE: set["ServerProcess"] = set()


@atexit.register
def _stop_leftovers() -> None:
    """A test that failed between starting servers and stopping them must not leave them running."""
    for server in list(_LIVE):
        server.stop(timeout_s=5.0)


class ServerProcess:
    """`python -m <module> ...` with its log in a file; `address` once it listens."""

    def __init__(self, module: str, args: list[str], log_path: pathlib.Path, startup_timeout_s: float = 120.0,
                 secure_ca: str | None = None, client_cert: tuple[str, str] | None = None):
        self.module = module
        self.secure_ca = secure_ca
        self.client_cert = client_cert
        self.log_path = log_path
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", "0", *args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env,
        )
        _LIVE.add(self)
        self.address = self._wait_listening(startup_timeout_s)

    def log(self) -> str:
        return self.log_path.read_text()

    def _wait_listening(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log())
            if match:
                address = f"127.0.0.1:{match.group(1)}"
                if self.secure_ca is None:
                    channel = grpc.insecure_channel(address)
                else:
                    cert, key = (pathlib.Path(p).read_bytes() for p in self.client_cert) if self.client_cert else (
                        None, None)
                    credentials = grpc.ssl_channel_credentials(pathlib.Path(self.secure_ca).read_bytes(), key, cert)
                    channel = grpc.secure_channel(f"localhost:{match.group(1)}", credentials)
                with channel:
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                return address
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.module} exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"{self.module} did not start within {timeout_s}s:\n{self.log()}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 30.0) -> int:
        _LIVE.discard(self)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def start_draft(model_dir: str, log_dir: pathlib.Path, name: str, *extra: str, **security) -> ServerProcess:
    return ServerProcess("draft_server", ["--model", model_dir, "--threads", "1", "--dtype", "float32", *extra],
                         log_dir / f"{name}.log", **security)


def start_target(model_dir: str, log_dir: pathlib.Path, name: str, drafts: list[str], *extra: str,
                 secure_ca: str | None = None) -> ServerProcess:
    draft_args = [arg for address in drafts for arg in ("--draft", address)]
    return ServerProcess("target_server", ["--model", model_dir, "--threads", "1", "--dtype", "float32",
                                           "--device", "cpu", *draft_args, *extra], log_dir / f"{name}.log",
                         secure_ca=secure_ca)


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from procfs."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
