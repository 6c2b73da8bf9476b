"""Operations with real processes: metrics, TLS / mutual TLS / bearer tokens, message limits, graceful shutdown."""

import pathlib
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from splitspec_client import (Client, DeadlineExceededError, ResourceExhaustedError, UnauthenticatedError,
                              UnavailableError)
from splitspec_client.v1 import draft_pb2, draft_pb2_grpc

from certs import make_pki
from scrape import METRICS_FLAGS, metric, scrape
from servers import start_draft, start_target

PROMPT = "The quick brown fox"
def test_prometheus_metrics_on_both_halves(model_dirs, log_dir, reference):
    draft = start_draft(model_dirs["related_draft"], log_dir, "metrics-draft", *METRICS_FLAGS)
    target = start_target(model_dirs["target"], log_dir, "metrics-target", [draft.address], *METRICS_FLAGS)
    try:
        with Client(target.address, timeout=60) as client:
            result = client.generate(PROMPT, max_new_tokens=24, ignore_eos=True, num_speculative_tokens=3)
            list(client.stream(PROMPT, max_new_tokens=8))
            with pytest.raises(Exception):
                client.generate(PROMPT, max_new_tokens=0)
        assert list(result.token_ids) == reference(PROMPT, 24)
        text = scrape(target)
        generate = "/splitspec.v1.TargetService/Generate"
        assert metric(text, "splitspec:rpc_requests_total", method=generate, code="OK") == 1
        assert metric(text, "splitspec:rpc_requests_total", method=generate, code="INVALID_ARGUMENT") == 1
        assert metric(text, "splitspec:rpc_requests_total", method="/splitspec.v1.TargetService/GenerateStream",
                      code="OK") == 1
        assert metric(text, "splitspec:spec_decode_num_drafts_total") >= result.stats.num_drafts
        assert metric(text, "splitspec:spec_decode_num_accepted_tokens_total") >= result.stats.num_accepted_tokens
        assert metric(text, "splitspec:spec_decode_num_accepted_tokens_per_pos_total", position="0") >= 0
        assert metric(text, "splitspec:time_to_first_token_seconds_count") == 2
        assert metric(text, "splitspec:e2e_request_latency_seconds_count") == 2
        assert metric(text, "splitspec:inter_token_latency_seconds_count") > 0
        assert metric(text, "splitspec:num_requests_running") == 0
        assert metric(text, "splitspec:generation_tokens_total") == 32
        # The draft ends its side of a session after the client has its answer: wait for the last one to close.
        speculate = "/splitspec.v1.DraftService/Speculate"
        deadline = time.monotonic() + 5
        while True:
            draft_text = scrape(draft)
            try:
                closed = (metric(draft_text, "splitspec:rpc_requests_total", method=speculate, code="OK") == 2
                          and metric(draft_text, "splitspec:draft_live_sessions") == 0)
            except KeyError:
                closed = False
            if closed or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert metric(draft_text, "splitspec:draft_blocks_total") >= result.stats.num_drafts
        assert metric(draft_text, "splitspec:draft_live_sessions") == 0
        assert metric(draft_text, "splitspec:rpc_requests_total", method=speculate, code="OK") == 2
        # Only the target holds forwards back to regroup sessions: the draft exports no such counter.
        assert metric(text, "splitspec:batch_regroup_wait_seconds_total") >= 0
        assert "batch_regroup_wait" not in draft_text
    finally:
        assert target.stop() == 0
        assert draft.stop() == 0


@pytest.fixture(scope="module")
def metered(model_dirs, log_dir):
    """A target with metrics and its draft. Tests read the changes their own calls make to the counters."""
    draft = start_draft(model_dirs["related_draft"], log_dir, "metered-draft", *METRICS_FLAGS)
    target = start_target(model_dirs["target"], log_dir, "metered-target", [draft.address], *METRICS_FLAGS)
    yield target
    assert target.stop() == 0
    assert draft.stop() == 0


def _rpc_counts(target, method: str) -> dict[str, float]:
    counts = {}
    for line in scrape(target).splitlines():
        if line.startswith("splitspec:rpc_requests_total{") and f'method="{method}"' in line:
            counts[line.split('code="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return counts


def _wait_for_rpc_count(target, method: str, total: float) -> dict[str, float]:
    """The method's counts by code once they add up to `total` (a cancelled handler finishes after the client)."""
    deadline = time.monotonic() + 10
    while sum((counts := _rpc_counts(target, method)).values()) < total and time.monotonic() < deadline:
        time.sleep(0.05)
    return counts


GENERATE, GENERATE_STREAM = "/splitspec.v1.TargetService/Generate", "/splitspec.v1.TargetService/GenerateStream"


def test_a_call_past_its_deadline_is_counted_as_deadline_exceeded_and_a_cancelled_one_as_cancelled(metered):
    before = {method: _rpc_counts(metered, method) for method in (GENERATE, GENERATE_STREAM)}
    with Client(metered.address) as client:
        # 480 tokens take the tiny model about a second.
        with pytest.raises(DeadlineExceededError):
            client.generate(PROMPT, max_new_tokens=480, ignore_eos=True, timeout=0.2)
        with pytest.raises(DeadlineExceededError):
            list(client.stream(PROMPT, max_new_tokens=480, ignore_eos=True, timeout=0.2))
        chunks = client.stream(PROMPT, max_new_tokens=480, ignore_eos=True, timeout=60)
        next(chunks)
        chunks.close()
    for method, calls in ((GENERATE, 1), (GENERATE_STREAM, 2)):
        after = _wait_for_rpc_count(metered, method, sum(before[method].values()) + calls)
        change = {code: count - before[method].get(code, 0) for code, count in after.items()}
        assert {code: count for code, count in change.items() if count} == (
            {"DEADLINE_EXCEEDED": 1} if method == GENERATE else {"DEADLINE_EXCEEDED": 1, "CANCELLED": 1})


def _token_counters(target) -> dict[str, float]:
    text = scrape(target)
    names = ["generation_tokens_total", "prompt_tokens_total", "spec_decode_num_accepted_tokens_total",
             "time_to_first_token_seconds_count"]
    counters = {name: metric(text, f"splitspec:{name}") for name in names}
    counters["rounds"] = sum(metric(text, "splitspec:decode_rounds_total", kind=kind)
                             for kind in ("speculative", "target_only"))
    return counters


def test_tokens_of_cancelled_and_timed_out_requests_are_counted_as_they_are_generated(metered):
    """As vLLM counts them: per round, not when a request finishes, so that generation_tokens_total agrees with
    the spec_decode counters (accepted + one per round) whatever ends the request."""
    with Client(metered.address, timeout=60) as client:
        prompt_tokens = client.generate(PROMPT, max_new_tokens=1).stats.prompt_tokens
        before = _token_counters(metered)
        calls_before = {method: sum(_rpc_counts(metered, method).values()) for method in (GENERATE, GENERATE_STREAM)}
        received = 0
        for received, _chunk in enumerate(client.stream(PROMPT, max_new_tokens=480, ignore_eos=True), 1):
            if received == 3:
                break
        with pytest.raises(DeadlineExceededError):
            client.generate(PROMPT, max_new_tokens=480, ignore_eos=True, timeout=0.2)
    for method, total in calls_before.items():
        _wait_for_rpc_count(metered, method, total + 1)
    change = {name: value - before[name] for name, value in _token_counters(metered).items()}
    assert change["prompt_tokens_total"] == 2 * prompt_tokens
    assert change["time_to_first_token_seconds_count"] == 2
    assert change["generation_tokens_total"] >= received + 1
    # Neither request reached its length: each round gave its accepted tokens and one of the target's.
    assert change["generation_tokens_total"] == change["spec_decode_num_accepted_tokens_total"] + change["rounds"]


@pytest.fixture(scope="module")
def secured(model_dirs, log_dir, tmp_path_factory):
    """Draft: mutual TLS, only certificate 'target' allowed, token required. Target: TLS and a token for clients."""
    directory = tmp_path_factory.mktemp("pki")
    pki = make_pki(directory, ["target", "draft", "intruder"])
    (directory / "draft-token").write_text("draft-secret\n")
    (directory / "client-token").write_text("client-secret\n")
    ca = pki["ca"][0]
    draft = start_draft(model_dirs["related_draft"], log_dir, "secure-draft",
                        "--tls-cert", pki["draft"][0], "--tls-key", pki["draft"][1], "--tls-client-ca", ca,
                        "--allowed-client-names", "target", "--auth-token-file", str(directory / "draft-token"),
                        secure_ca=ca, client_cert=pki["target"])
    target = start_target(model_dirs["target"], log_dir, "secure-target", [f"localhost:{draft.address.split(':')[1]}"],
                          "--tls-cert", pki["target"][0], "--tls-key", pki["target"][1],
                          "--auth-token-file", str(directory / "client-token"),
                          "--draft-tls-ca", ca, "--draft-tls-cert", pki["target"][0],
                          "--draft-tls-key", pki["target"][1],
                          "--draft-auth-token-file", str(directory / "draft-token"), secure_ca=ca)
    yield pki, draft, target
    assert target.stop() == 0
    assert draft.stop() == 0


def _tls(pki, name=None):
    ca = pathlib.Path(pki["ca"][0]).read_bytes()
    if name is None:
        return grpc.ssl_channel_credentials(ca)
    cert, key = (pathlib.Path(p).read_bytes() for p in pki[name])
    return grpc.ssl_channel_credentials(ca, key, cert)


def test_tls_and_tokens_protect_the_target(secured, reference):
    pki, draft, target = secured
    address = f"localhost:{target.address.split(':')[1]}"
    with Client(address, credentials=_tls(pki), metadata=[("authorization", "Bearer client-secret")],
                timeout=60) as client:
        result = client.generate(PROMPT, max_new_tokens=16, ignore_eos=True)
    assert list(result.token_ids) == reference(PROMPT, 16)
    assert result.stats.num_drafts > 0 and not result.stats.fallback_reason  # the draft accepted the target

    with Client(address, credentials=_tls(pki), timeout=30) as client:
        with pytest.raises(UnauthenticatedError, match="missing bearer token"):
            client.generate(PROMPT, max_new_tokens=4)
    with Client(address, credentials=_tls(pki), metadata=[("authorization", "Bearer wrong")], timeout=30) as client:
        with pytest.raises(UnauthenticatedError, match="invalid bearer token"):
            client.info()
    with Client(address, timeout=10) as client:  # plaintext against a TLS port
        with pytest.raises(UnavailableError):
            client.info()


def test_draft_only_answers_the_target(secured):
    pki, draft, _ = secured
    address = f"localhost:{draft.address.split(':')[1]}"
    token = [("authorization", "Bearer draft-secret")]
    with grpc.secure_channel(address, _tls(pki, "intruder")) as channel:
        with pytest.raises(grpc.RpcError) as error:
            draft_pb2_grpc.DraftServiceStub(channel).Info(draft_pb2.DraftInfoRequest(), metadata=token, timeout=10)
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED and "intruder" in error.value.details()
    with grpc.secure_channel(address, _tls(pki, "target")) as channel:
        stub = draft_pb2_grpc.DraftServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.Info(draft_pb2.DraftInfoRequest(), timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Info(draft_pb2.DraftInfoRequest(), metadata=token, timeout=10).vocabulary.vocab_size > 0
        # Health stays open to probes.
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
    with grpc.secure_channel(address, _tls(pki)) as channel:  # no client certificate: the handshake fails
        with pytest.raises(grpc.RpcError) as error:
            draft_pb2_grpc.DraftServiceStub(channel).Info(draft_pb2.DraftInfoRequest(), metadata=token, timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_message_size_limit_is_resource_exhausted(model_dirs, log_dir):
    target = start_target(model_dirs["target"], log_dir, "small-messages", [], "--max-message-bytes", "2000")
    try:
        with Client(target.address, timeout=30) as client:
            with pytest.raises(ResourceExhaustedError):
                client.generate("x" * 3000, max_new_tokens=2)
            assert client.generate([5] * 10, max_new_tokens=2).stats.generated_tokens >= 1
    finally:
        assert target.stop() == 0


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(model_dirs, log_dir, reference):
    target = start_target(model_dirs["target"], log_dir, "draining-target", [], "--shutdown-grace", "60")
    first_chunk = threading.Event()
    outcome = {}

    def long_request():
        with Client(target.address, timeout=120) as client:
            chunks = []
            for chunk in client.stream(PROMPT, max_new_tokens=450, ignore_eos=True):
                chunks.append(chunk)
                first_chunk.set()
            outcome["token_ids"] = [t for c in chunks for t in c.token_ids]

    thread = threading.Thread(target=long_request)
    thread.start()
    assert first_chunk.wait(60)
    target.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    # While the request drains, probes learn to send no more (rather than finding the port closed).
    with grpc.insecure_channel(target.address) as channel:
        health_status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert health_status == health_pb2.HealthCheckResponse.NOT_SERVING
    with Client(target.address, timeout=10) as client:
        with pytest.raises(UnavailableError, match="shutting down"):
            client.generate(PROMPT, max_new_tokens=4)
    assert "token_ids" not in outcome, "the stream ended before the checks above: make it longer"
    thread.join(120)
    assert outcome["token_ids"] == reference(PROMPT, 450)  # the in-flight request finished, whole
    assert target.process.wait(60) == 0
    target.stop()


def test_cli_connects_with_tls_and_token(secured, tmp_path):
    import json
    import subprocess
    import sys

    pki, _, target = secured
    token_file = tmp_path / "token"
    token_file.write_text("client-secret\n")
    command = [sys.executable, "-m", "splitspec_client", "generate", PROMPT, "--max-new-tokens", "6", "--json",
               "--target", f"localhost:{target.address.split(':')[1]}", "--tls-ca", pki["ca"][0]]
    completed = subprocess.run([*command, "--token-file", str(token_file)], capture_output=True, text=True,
                               timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert len(json.loads(completed.stdout)["token_ids"]) == 6
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr


def test_json_logs_carry_the_request_id_on_both_halves(model_dirs, log_dir):
    import json

    draft = start_draft(model_dirs["related_draft"], log_dir, "json-draft", "--log-format", "json")
    target = start_target(model_dirs["target"], log_dir, "json-target", [draft.address], "--log-format", "json")
    try:
        with Client(target.address, timeout=60) as client:
            client.generate(PROMPT, max_new_tokens=8, request_id="req-1234")
    finally:
        assert target.stop() == 0
        assert draft.stop() == 0
    for server in (draft, target):
        records = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        assert any(r.get("request_id") == "req-1234" for r in records), server.module
