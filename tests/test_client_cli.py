"""The `splitspec` CLI against a scripted in-process TargetService (fake_target.py): text and JSON output, errors as
exit statuses, and arguments refused before any call."""

import json
import subprocess
import sys

import grpc
import pytest

from fake_target import address, fake  # noqa: F401 (fixtures)
from splitspec_client._request import build_generate_request
from splitspec_client.cli import main


def test_cli_streams_text_then_a_summary(fake, address, capsys):
    argv = ["generate", "Capital of France?", "--target", address, "--top-p", "0.9", "--stop", "\n", "--stop", "END"]
    assert main([*argv, "--num-speculative-tokens", "0", "--ignore-eos"]) == 0
    out, err = capsys.readouterr()
    assert out == " Paris.\n"
    assert "[eos_token] 3 tokens in 1.50 s (2.0 tokens/s), TTFT 120 ms" in err
    assert "acceptance rate 0.38, mean accepted length 2.50" in err
    # Flags not given keep the SDK's defaults.
    assert fake.requests == [
        build_generate_request(
            "Capital of France?", top_p=0.9, stop=["\n", "END"], num_speculative_tokens=0, ignore_eos=True
        )
    ]


def test_cli_no_stream_and_json(fake, address, capsys):
    assert main(["generate", "x", "--target", address, "--no-stream", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out == " Paris.\n"
    assert main(["generate", "x", "--target", address, "--json", "--seed", "7"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["text"] == " Paris." and printed["token_ids"] == [3681, 13, 2]
    assert printed["finish_reason"] == "eos_token"
    assert printed["stats"]["num_accepted_tokens_per_pos"] == [2, 1, 0, 0]
    assert printed["stats"]["time_to_first_token_ns"] == 120_000_000
    assert [request.max_new_tokens for request in fake.requests] == [3, 64]
    assert fake.requests[1].sampling.seed == 7


def test_cli_info_from_env_target(address, capsys, monkeypatch):
    monkeypatch.setenv("SPLITSPEC_TARGET", address)
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["draft_servers"][1]["error"] == "connection refused"
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "model: tiny-llama (bfloat16 on cuda)" in out
    assert "num speculative tokens: 4 (max 8)" in out
    assert "  cpu-2:50052: connection refused" in out


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 2),
        (grpc.StatusCode.FAILED_PRECONDITION, 2),
        (grpc.StatusCode.UNAVAILABLE, 1),
        (grpc.StatusCode.INTERNAL, 1),
    ],
)
def test_cli_errors(fake, address, capsys, code, exit_code):
    fake.abort = (code, "max_new_tokens: must be >= 1, got 0")
    assert main(["generate", "x", "--target", address, "--max-new-tokens", "0"]) == exit_code
    out, err = capsys.readouterr()
    assert err == f"error: {code.name}: max_new_tokens: must be >= 1, got 0\n"


# No server listens at this address: each of these fails before any call.
UNREACHABLE = "127.0.0.1:1"


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["generate", "x", "--seed", "-1"], "--seed"),
        (["generate", "x", "--seed", str(2**64)], "--seed"),
        (["generate", "x", "--max-new-tokens", "3000000000"], "--max-new-tokens"),
        (["generate", "x", "--top-k", str(-(2**31) - 1)], "--top-k"),
        (["loadtest", "--seed", "-1"], "--seed"),
        (["loadtest", "--num-speculative-tokens", str(2**31)], "--num-speculative-tokens"),
    ],
)
def test_cli_refuses_integers_the_request_cannot_carry(argv, option, capsys):
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--target", UNREACHABLE])
    assert exited.value.code == 2
    errors_printed = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors_printed) == 1 and f"argument {option}: must be in [" in errors_printed[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "\udcff"], "error: prompt: 'utf-8' codec can't encode"),
        (["loadtest", "--prompt", "x", "--prompt", "\udcff", "--total", "1"], "error: prompt: 'utf-8' codec"),
        (["info", "--tls-ca", "/nonexistent/ca.pem"], "error: --tls-ca: [Errno 2]"),
        (["info", "--tls-cert", "/nonexistent/client.pem"], "error: --tls-cert and --tls-key: give both or neither"),
        (["info", "--token-file", "/nonexistent/token"], "error: --token-file: [Errno 2]"),
    ],
)
def test_cli_argument_errors_found_before_any_call_exit_2(argv, message, capsys):
    assert main([*argv, "--target", UNREACHABLE]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(message) and err.count("\n") == 1


def test_cli_refuses_bad_arguments_in_one_line_without_a_traceback():
    completed = subprocess.run(
        [sys.executable, "-m", "splitspec_client", "generate", "x", "--seed", "-1", "--target", UNREACHABLE],
        capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert completed.stderr.splitlines()[-1].endswith(f"error: argument --seed: must be in [0, {2**64 - 1}], got -1")
