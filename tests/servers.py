"""Starting the real servers as OS processes on loopback, for integration tests."""

import atexit
import pathlib
import time

import grpc

from splitspec import launch

_LIVE: set["ServerProcess"] = set()


@atexit.register
def _stop_leftovers() -> None:
    """A test that failed between starting servers and stopping them must not leave them running."""
    for server in list(_LIVE):
        server.stop(timeout_s=5.0)


class ServerProcess(launch.ServerProcess):
    """The launcher's server process, one torch thread, TLS-aware health check, and never left running."""

    def __init__(self, module: str, args: list[str], log_path: pathlib.Path, secure_ca: str | None = None,
                 client_cert: tuple[str, str] | None = None):
        credentials = None
        if secure_ca is not None:
            cert, key = (pathlib.Path(p).read_bytes() for p in client_cert) if client_cert else (None, None)
            credentials = grpc.ssl_channel_credentials(pathlib.Path(secure_ca).read_bytes(), key, cert)
        super().__init__(module, args, log_path, threads=1, health_credentials=credentials)
        _LIVE.add(self)

    def stop(self, timeout_s: float = 30.0) -> int:
        _LIVE.discard(self)
        return super().stop(timeout_s)


def start_draft(model_dir: str, log_dir: pathlib.Path, name: str, *extra: str, **security) -> ServerProcess:
    return ServerProcess("draft_server", ["--model", model_dir, "--threads", "1", "--dtype", "float32", *extra],
                         log_dir / f"{name}.log", **security)


def start_target(model_dir: str, log_dir: pathlib.Path, name: str, drafts: list[str], *extra: str,
                 **security) -> ServerProcess:
    draft_args = [arg for address in drafts for arg in ("--draft", address)]
    return ServerProcess("target_server", ["--model", model_dir, "--threads", "1", "--dtype", "float32",
                                           "--device", "cpu", *draft_args, *extra], log_dir / f"{name}.log",
                         **security)


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from procfs."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_until(condition, timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll `condition` until it holds (True) or `timeout_s` passes (its last answer)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return condition()
