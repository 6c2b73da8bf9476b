"""deploy/docker: the Dockerfiles pass hadolint, the compose file validates against the compose specification's
JSON schema (as vendored by check-jsonschema), and what they start is consistent: flags the servers accept, the
health check on the served port, the draft's CPU list in both places, a GPU for the target. The health probe that
the images run is checked against a real server. No image is built here: base images cannot be pulled.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from concurrent import futures

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2_grpc

from certs import make_pki
from draft_server.cli import build_parser as draft_parser
from target_server.cli import build_parser as target_parser

DOCKER_DIR = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "docker"
DOCKERFILES = {"draft": DOCKER_DIR / "Dockerfile.draft", "target": DOCKER_DIR / "Dockerfile.target"}
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
PARSERS = {"draft": draft_parser, "target": target_parser}


def tool(name: str) -> str:
    """A lint tool from the dev extra, which `make install` installs."""
    path = shutil.which(name, path=str(pathlib.Path(sys.executable).parent)) or shutil.which(name)
    assert path, f"{name} is missing: `make install` installs it (the dev extra of pyproject.toml)"
    return path


def hadolint(*dockerfiles: pathlib.Path) -> subprocess.CompletedProcess:
    # The default failure threshold is "info": any finding fails.
    return subprocess.run([tool("hadolint"), "--no-color", *map(str, dockerfiles)],
                          capture_output=True, text=True, timeout=120)


def validate_compose(path: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_dockerfiles_pass_hadolint():
    result = hadolint(*DOCKERFILES.values())
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("broken", [
    pytest.param(lambda text: text.replace("torch==2.13.0", "torch"), id="unpinned-package"),
    pytest.param(lambda text: text.replace("FROM python:3.11-slim-bookworm AS base", "FROM python AS base"),
                 id="untagged-base-image"),
])
def test_hadolint_catches_a_broken_dockerfile(tmp_path, broken):
    """Negative control: the lint above would fail on each of these."""
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(broken(DOCKERFILES["draft"].read_text()))
    assert hadolint(dockerfile).returncode != 0


def test_compose_file_matches_the_compose_specification():
    result = validate_compose(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("broken", [
    pytest.param(lambda text: text.replace("cpuset:", "cpuset_cpus:"), id="unknown-key"),
    pytest.param(lambda text: text.replace("capabilities: [gpu]", "capabilities: gpu"), id="wrong-type"),
])
def test_compose_validation_catches_a_broken_file(tmp_path, broken):
    """Negative control: the validation above would fail on each of these."""
    compose = tmp_path / "compose.yaml"
    compose.write_text(broken(COMPOSE_FILE.read_text()))
    assert validate_compose(compose).returncode != 0


def instructions(dockerfile: pathlib.Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined, comments dropped."""
    lines = [line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    parsed = [tuple(line.split(None, 1)) for line in joined.splitlines() if line.strip()]
    last_from = max(index for index, (keyword, _) in enumerate(parsed) if keyword == "FROM")
    return [(keyword.upper(), arguments) for keyword, arguments in parsed[last_from:]]


def final_stage(half: str) -> dict[str, str]:
    return dict(instructions(DOCKERFILES[half]))


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default}, with every variable unset."""
    result = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
    assert "$" not in result, f"{value!r}: give every variable a default"
    return result


def compose_services() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


@pytest.mark.parametrize("half", ["draft", "target"])
def test_image_runs_as_non_root_and_checks_health_on_its_port(half):
    stage = final_stage(half)
    user = stage["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0
    entrypoint = json.loads(stage["ENTRYPOINT"])
    port = entrypoint[entrypoint.index("--port") + 1]
    probe = json.loads(stage["HEALTHCHECK"].split("CMD", 1)[1])
    assert probe[1:3] == ["-m", "splitspec_client.health"] and probe[3] == f"127.0.0.1:{port}"
    assert stage["EXPOSE"] == port


@pytest.mark.parametrize("half", ["draft", "target"])
def test_compose_starts_each_server_with_flags_it_accepts(half):
    entrypoint = json.loads(final_stage(half)["ENTRYPOINT"])
    command = [interpolate(str(word)) for word in compose_services()[half]["command"]]
    args = PARSERS[half]().parse_args(entrypoint[1:] + command)
    assert args.model.startswith("/models/")


def test_compose_pins_the_draft_and_gives_the_target_a_gpu():
    services = compose_services()
    draft, target = services["draft"], services["target"]
    draft_args = draft_parser().parse_args([interpolate(str(word)) for word in draft["command"]])
    # The container's cpuset and the server's own pinning name the same CPUs, and its threads fit them.
    assert draft["command"][draft["command"].index("--cpus") + 1] == draft["cpuset"]
    assert draft_args.numa_node is not None and len(draft_args.cpus) == draft_args.threads
    assert interpolate(draft["environment"]["OMP_NUM_THREADS"]) == str(draft_args.threads)
    assert "SYS_NICE" in draft["cap_add"], "set_mempolicy needs it under Docker's default seccomp profile"
    (gpu,) = target["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["capabilities"] == ["gpu"] and (gpu["count"] == "all" or int(gpu["count"]) >= 1)
    # The target reaches the draft by its service name, on the port the draft image serves.
    target_args = target_parser().parse_args([interpolate(str(word)) for word in target["command"]])
    draft_entrypoint = json.loads(final_stage("draft")["ENTRYPOINT"])
    assert target_args.draft == [f"draft:{draft_entrypoint[draft_entrypoint.index('--port') + 1]}"]


def run_probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitspec_client.health", *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_health_probe_reports_a_serving_server(target_related):
    serving = run_probe(target_related.address)
    assert serving.returncode == 0 and serving.stdout.strip() == f"{target_related.address}: SERVING"
    assert run_probe(target_related.address, "--service", "splitspec.v1.TargetService").returncode == 0
    unknown = run_probe(target_related.address, "--service", "no.such.Service")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr


def test_health_probe_fails_when_nothing_listens():
    # Port 1 on loopback: nothing listens there, so the connection is refused at once.
    refused = run_probe("127.0.0.1:1", "--timeout", "5")
    assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), ["target", "prober"])


@pytest.fixture
def tls_health_server(pki, request):
    """A health service answering SERVING over TLS with the certificate of "target" (valid for that name and
    127.0.0.1); with request.param true, it also requires a client certificate (mutual TLS, as a draft server can)."""
    cert, key = (pathlib.Path(path).read_bytes() for path in pki["target"])
    mutual = request.param
    credentials = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=pathlib.Path(pki["ca"][0]).read_bytes() if mutual else None,
        require_client_auth=mutual)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.mark.parametrize("tls_health_server", [False], indirect=True)
def test_health_probe_speaks_tls(tls_health_server, pki):
    address, ca = tls_health_server, pki["ca"][0]
    serving = run_probe(address, "--tls-ca", ca, "--tls-server-name", "target")
    assert serving.returncode == 0 and serving.stdout.strip() == f"{address}: SERVING"
    plaintext = run_probe(address, "--timeout", "5")
    assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr
    # The name is checked against the certificate: the option really replaces the address's host.
    assert run_probe(address, "--tls-ca", ca, "--tls-server-name", "elsewhere", "--timeout", "5").returncode == 1
    # A container's HEALTHCHECK gives only the address: the TLS settings come from its environment.
    environment = {**os.environ, "SPLITSPEC_HEALTH_TLS_CA": ca, "SPLITSPEC_HEALTH_TLS_SERVER_NAME": "target"}
    assert run_probe(address, env=environment).returncode == 0


@pytest.mark.parametrize("tls_health_server", [True], indirect=True)
def test_health_probe_presents_a_client_certificate(tls_health_server, pki):
    address, ca = tls_health_server, pki["ca"][0]
    cert, key = pki["prober"]
    assert run_probe(address, "--tls-ca", ca, "--tls-cert", cert, "--tls-key", key).returncode == 0
    without = run_probe(address, "--tls-ca", ca, "--timeout", "5")
    assert without.returncode == 1 and "UNAVAILABLE" in without.stderr
    environment = {**os.environ, "SPLITSPEC_HEALTH_TLS_CA": ca, "SPLITSPEC_HEALTH_TLS_CERT": cert,
                   "SPLITSPEC_HEALTH_TLS_KEY": key}
    assert run_probe(address, env=environment).returncode == 0


def test_health_probe_reports_an_unreadable_tls_file():
    unreadable = run_probe("127.0.0.1:1", "--tls-ca", "/nonexistent/ca.pem")
    assert unreadable.returncode == 1 and "--tls-ca: [Errno 2]" in unreadable.stderr


@pytest.mark.parametrize("half", ["draft", "target"])
def test_compose_stop_grace_outlasts_the_shutdown_grace(half):
    """Docker SIGKILLs a container still running at stop_grace_period: the server's --shutdown-grace, then its own
    stopping (cancelled calls, the model worker) must fit inside it."""
    service = compose_services()[half]
    entrypoint = json.loads(final_stage(half)["ENTRYPOINT"])
    args = PARSERS[half]().parse_args(entrypoint[1:] + [interpolate(str(word)) for word in service["command"]])
    stop_grace_s = int(re.fullmatch(r"(\d+)s", service["stop_grace_period"])[1])
    assert stop_grace_s >= args.shutdown_grace + 10
