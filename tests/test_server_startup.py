"""Starting and stopping the servers as an operator does: bad settings are one error line with exit status 2 before
the model loads; an address in use exits 1 (systemd retries it), a wrong one 2; IPv6 addresses with or without
brackets; shutdown with no grace, and a second signal that cuts the grace short. Also the bearer-token details."""

import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from splitspec_client import Client

from certs import make_pki
from draft_server import cli as draft_cli
from servers import start_target
from splitspec.errors import Unauthenticated
from splitspec.security import ServerSecurity, read_token
from target_server import cli as target_cli

PROMPT = "The quick brown fox"
CLIS = {"draft": draft_cli, "target": target_cli}
MODELS = {"draft": "related_draft", "target": "target"}


@pytest.mark.parametrize("half", ["draft", "target"])
@pytest.mark.parametrize("flag, value", [("--port", "70000"), ("--port", "-5"), ("--metrics-port", "65536")])
def test_ports_outside_0_to_65535_are_usage_errors(half, flag, value, capsys):
    parser = CLIS[half].build_parser()
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--model", "m", flag, value])
    assert exited.value.code == 2
    assert f"splitspec-{half}: error: argument {flag}: must be in [0, 65535], got {value}" in capsys.readouterr().err
    assert getattr(parser.parse_args(["--model", "m", flag, "0"]), flag[2:].replace("-", "_")) == 0  # a free port


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("settings")
    make_pki(directory, ["server", "other"])
    (directory / "empty-token").write_text("\n")
    (directory / "two-line-token").write_text("secret\nmore\n")
    (directory / "garbage.pem").write_text("not a certificate\n")
    return directory


BOTH_HALVES = [
    (["--shutdown-grace", "-1"], "--shutdown-grace must be a number of seconds, 0 or more"),
    (["--max-message-bytes", "0"], "--max-message-bytes must be in [1024, 2147483647]"),
    (["--keepalive-time", "-1"], "--keepalive-time must be 0 (off) or a number of seconds in [0.001, 86400.0]"),
    (["--keepalive-time", "1e9"], "--keepalive-time must be 0 (off) or a number of seconds in [0.001, 86400.0]"),
    (["--keepalive-timeout", "0"], "--keepalive-timeout must be a number of seconds in [0.001, 86400.0]"),
    (["--keepalive-timeout", "nan"], "--keepalive-timeout must be a number of seconds in [0.001, 86400.0]"),
    (["--auth-token-file", "{d}/empty-token"], "--auth-token-file {d}/empty-token is empty"),
    (["--auth-token-file", "{d}/two-line-token"], "--auth-token-file {d}/two-line-token holds more than one line"),
    (["--auth-token-file", "{d}/missing"], "--auth-token-file {d}/missing: No such file or directory"),
    (["--tls-cert", "{d}/garbage.pem", "--tls-key", "{d}/server.key"],
     "--tls-cert {d}/garbage.pem: not a usable TLS certificate"),
    (["--tls-cert", "{d}/server.pem", "--tls-key", "{d}/other.key"],
     "--tls-key {d}/other.key: not a usable TLS private key of --tls-cert {d}/server.pem (key values mismatch)"),
    (["--tls-cert", "{d}/server.pem", "--tls-key", "{d}/server.key", "--tls-client-ca", "{d}/garbage.pem"],
     "--tls-client-ca {d}/garbage.pem: not a usable TLS certificate"),
]
TARGET_ONLY = [
    (["--max-concurrent-requests", "-1"], "--max-concurrent-requests must be at least 1"),
    (["--draft-timeout", "0"], "--draft-timeout must be a number of seconds above 0"),
    (["--draft-probe-interval", "0"], "--draft-probe-interval must be a number of seconds above 0"),
    (["--max-draft-reopens", "-1"], "--max-draft-reopens must be 0 or more"),
    (["--draft-tls-ca", "{d}/garbage.pem"], "--draft-tls-ca {d}/garbage.pem: not a usable TLS certificate"),
    (["--max-input-tokens", "0"], "--max-input-tokens must be at least 1"),
    (["--max-total-tokens", "1"], "--max-total-tokens must be at least 2"),
    (["--max-stop-sequences", "-1"], "--max-stop-sequences must be 0 or more"),
]
# Each of these let the draft start and then refuse every session (or fail it with INTERNAL).
DRAFT_ONLY = [
    (["--max-sessions", "0"], "--max-sessions must be at least 1"),
    (["--max-num-speculative-tokens", "0"], "--max-num-speculative-tokens must be at least 1"),
    (["--max-draft-support", "0"], "--max-draft-support must be at least 1"),
]


@pytest.mark.parametrize("half, flags, message", [("draft", *case) for case in BOTH_HALVES + DRAFT_ONLY]
                         + [("target", *case) for case in BOTH_HALVES + TARGET_ONLY])
def test_bad_settings_are_one_error_line_before_the_model_loads(half, flags, message, files, capsys):
    # No such model: a check made after loading it would fail on the model instead.
    device = ["--device", "cpu"] if half == "target" else []
    assert CLIS[half].main(["--model", str(files / "no-model"), *device, *(f.format(d=files) for f in flags)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"splitspec-{half}: error: {message.format(d=files)}")


def run_server(half: str, model_dir: str, *flags: str) -> subprocess.CompletedProcess:
    """A server that is expected to exit at start-up."""
    device = ["--device", "cpu"] if half == "target" else []
    return subprocess.run([sys.executable, "-m", f"{half}_server", "--model", model_dir, "--threads", "1",
                           "--dtype", "float32", *device, *flags],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def error_line(completed: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in completed.stderr, completed.stderr
    return completed.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("half", ["draft", "target"])
def test_a_model_that_does_not_load_is_a_usage_error(half, tmp_path):
    completed = run_server(half, str(tmp_path / "no-model"))
    assert completed.returncode == 2
    assert error_line(completed) == (f"splitspec-{half}: error: --model {tmp_path}/no-model: cannot load it: "
                                     f"{tmp_path}/no-model: no such directory (a local model directory; a hub id has "
                                     f"the form owner/name)")


@pytest.fixture
def busy_port():
    """A port another process listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize("half", ["draft", "target"])
def test_a_port_in_use_exits_1_so_that_systemd_retries(half, model_dirs, busy_port):
    completed = run_server(half, model_dirs[MODELS[half]], "--host", "127.0.0.1", "--port", str(busy_port))
    assert completed.returncode == 1
    assert error_line(completed) == (f"splitspec-{half}: error: cannot listen on 127.0.0.1:{busy_port}: "
                                     "Address already in use")


def test_a_metrics_port_in_use_exits_1_and_is_named(model_dirs, busy_port):
    completed = run_server("target", model_dirs["target"], "--host", "127.0.0.1", "--port", "0",
                           "--metrics-host", "127.0.0.1", "--metrics-port", str(busy_port))
    assert completed.returncode == 1
    assert error_line(completed) == (f"splitspec-target: error: metrics endpoint: cannot listen on "
                                     f"127.0.0.1:{busy_port}: Address already in use")


def test_a_socket_in_a_missing_directory_is_a_usage_error(model_dirs):
    completed = run_server("target", model_dirs["target"], "--host", "unix:///nonexistent/dir/s.sock")
    assert completed.returncode == 2
    assert error_line(completed) == ("splitspec-target: error: cannot listen on unix:///nonexistent/dir/s.sock: "
                                     "No such file or directory")


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_ipv6_hosts_with_or_without_brackets(host, model_dirs, log_dir):
    log_path = log_dir / f"ipv6-{host.strip('[]').replace(':', '')}-{len(host)}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "target_server", "--model", model_dirs["target"],
                                    "--device", "cpu", "--threads", "1", "--host", host, "--port", "0",
                                    "--metrics-host", host, "--metrics-port", "0"],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (serving := re.search(r"listening on (\S+)", log_path.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        assert serving[1].startswith("[::1]:")
        with grpc.insecure_channel(serving[1]) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        metrics_url = re.search(r"metrics on (http://\[::1\]:\d+/metrics)", log_path.read_text())[1]
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            assert b"splitspec:rpc_requests_total" in response.read()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0


def _streams(address: str, count: int, max_new_tokens: int):
    """`count` streams started on threads; returns (first chunk seen, outcomes: token count or the error, threads)."""
    first_chunk, outcomes = threading.Event(), []

    def stream():
        tokens = 0
        try:
            with Client(address, timeout=120) as client:
                for chunk in client.stream(PROMPT, max_new_tokens=max_new_tokens, ignore_eos=True):
                    tokens += len(chunk.token_ids)
                    first_chunk.set()
            outcomes.append(tokens)
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            outcomes.append(exc)

    threads = [threading.Thread(target=stream) for _ in range(count)]
    for thread in threads:
        thread.start()
    return first_chunk, outcomes, threads


def test_no_grace_cancels_streams_without_error_logs(model_dirs, log_dir):
    target = start_target(model_dirs["target"], log_dir, "no-grace", [], "--shutdown-grace", "0")
    first_chunk, outcomes, threads = _streams(target.address, 2, 450)
    assert first_chunk.wait(60)
    target.process.send_signal(signal.SIGTERM)
    assert target.process.wait(30) == 0
    for thread in threads:
        thread.join(60)
    target.stop()
    # Each cancelled handler used to outlive the event loop and be logged as an error, with a traceback.
    assert "Traceback" not in target.log() and " ERROR " not in target.log(), target.log()
    assert "cancelling 2 calls still in flight" in target.log()
    assert len(outcomes) == 2 and all(isinstance(outcome, Exception) for outcome in outcomes), outcomes


def test_a_second_signal_cancels_the_calls_in_flight_at_once(model_dirs, log_dir):
    target = start_target(model_dirs["target"], log_dir, "second-signal", [], "--shutdown-grace", "60")
    first_chunk, outcomes, threads = _streams(target.address, 2, 450)
    assert first_chunk.wait(60)
    target.process.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    target.process.send_signal(signal.SIGINT)
    assert target.process.wait(30) == 0
    for thread in threads:
        thread.join(60)
    target.stop()
    # 450 tokens take over a second here: a stream that finished would mean the grace period ran on.
    assert len(outcomes) == 2 and all(isinstance(outcome, Exception) for outcome in outcomes), outcomes
    assert "SIGINT again: cancelling the calls in flight now" in target.log()
    assert "Traceback" not in target.log(), target.log()


class _Call:
    def __init__(self, authorization: str):
        self.metadata = (("authorization", authorization),)

    def invocation_metadata(self):
        return self.metadata


@pytest.mark.parametrize("header", ["Bearer s3cret", "bearer s3cret", "BEARER s3cret"])
def test_the_bearer_scheme_is_case_insensitive(header):
    ServerSecurity(token="s3cret").authorize(_Call(header))


@pytest.mark.parametrize("header, problem", [("Basic s3cret", "missing bearer token"),
                                             ("Bearers3cret", "missing bearer token"),
                                             ("bearer other", "invalid bearer token")])
def test_other_schemes_and_tokens_are_refused(header, problem):
    with pytest.raises(Unauthenticated, match=problem):
        ServerSecurity(token="s3cret").authorize(_Call(header))


def test_a_token_file_holds_one_line(tmp_path):
    (tmp_path / "token").write_text("  s3cret \n")
    assert read_token(str(tmp_path / "token")) == "s3cret"
    (tmp_path / "two-lines").write_text("s3cret\nsecond\n")
    with pytest.raises(ValueError, match="more than one line"):
        read_token(str(tmp_path / "two-lines"))


def test_allowed_client_names_may_have_spaces():
    args = target_cli.build_parser().parse_args(["--model", "m", "--allowed-client-names", "target, other ,"])
    assert args.allowed_client_names == ["target", "other"]
