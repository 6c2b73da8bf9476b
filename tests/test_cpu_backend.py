"""Draft-side dtype choice and kernel backends."""

import importlib.metadata
import sys
import time
import types

import grpc
import pytest
import torch

from draft_server.cpu_backend import IpexBackend, choose_dtype, load_backend, measure_matmul_seconds
from splitspec.errors import FailedPrecondition


@pytest.mark.parametrize(
    "name, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)]
)
def test_named_dtype_is_taken_as_given(name, dtype):
    assert choose_dtype(name, "amx", measure=pytest.fail) is dtype
    assert choose_dtype(name, "avx2", measure=pytest.fail) is dtype


def test_auto_on_amx_is_bfloat16_without_measuring():
    assert choose_dtype("auto", "amx", measure=pytest.fail) is torch.bfloat16


@pytest.mark.parametrize(
    "seconds, expected",
    [
        ({torch.float32: 0.001, torch.bfloat16: 0.004}, torch.float32),  # bf16 emulated: slower
        ({torch.float32: 0.004, torch.bfloat16: 0.001}, torch.bfloat16),  # native bf16 dot products
        ({torch.float32: 0.002, torch.bfloat16: 0.002}, torch.float32),  # a tie keeps the precise dtype
    ],
)
@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_auto_without_amx_takes_the_faster_measured_dtype(seconds, expected, isa):
    measured = []

    def measure(dtype):
        measured.append(dtype)
        return seconds[dtype]

    assert choose_dtype("auto", isa, measure=measure) is expected
    assert sorted(map(str, measured)) == ["torch.bfloat16", "torch.float32"]


def test_unknown_dtype_names_the_flag_and_choices():
    with pytest.raises(ValueError, match=r"--dtype 'int4': expected one of auto, float32, bfloat16, float16"):
        choose_dtype("int4", "avx2")


def test_default_measurement_is_quick():
    assert 0 < measure_matmul_seconds(torch.float32, size=64, repeats=2) < 0.5
    # CPU time, not wall time: the servers of other tests share this machine's two cores.
    start = time.process_time()
    assert choose_dtype("auto", "avx2") in (torch.float32, torch.bfloat16)
    assert time.process_time() - start < 1.0


def test_torch_backend_is_identity():
    backend = load_backend("torch")
    model = torch.nn.Linear(4, 4)
    assert backend.name == "torch"
    assert backend.optimize(model, torch.float32) is model


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"--backend 'onnx': expected one of torch, ipex"):
        load_backend("onnx")


def test_ipex_not_installed_says_what_to_install():
    with pytest.raises(FailedPrecondition) as info:
        load_backend("ipex")
    message = info.value.message
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "intel-extension-for-pytorch is not installed" in message
    assert f"torch {torch.__version__}" in message
    assert "intel-extension-for-pytorch==2.8.0" in message and "torch==2.8" in message


def test_ipex_for_another_torch_is_refused_before_import(monkeypatch):
    # Importing a mismatched ipex would exit the process, so the version must be checked from metadata first.
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.8.0")
    monkeypatch.setitem(sys.modules, "intel_extension_for_pytorch", None)  # any import attempt would raise
    with pytest.raises(FailedPrecondition, match=r"intel-extension-for-pytorch 2\.8\.0 is installed beside torch"):
        load_backend("ipex")


def test_matching_ipex_optimizes_in_eval_mode(monkeypatch):
    calls = []
    def optimize(model, dtype):
        calls.append((model.training, dtype))
        return "optimized"

    fake_ipex = types.SimpleNamespace(optimize=optimize)
    torch_major_minor = ".".join(torch.__version__.split(".")[:2])
    monkeypatch.setattr(importlib.metadata, "version", lambda name: f"{torch_major_minor}.0")
    monkeypatch.setitem(sys.modules, "intel_extension_for_pytorch", fake_ipex)
    backend = load_backend("ipex")
    assert isinstance(backend, IpexBackend) and backend.name == "ipex"
    assert backend.optimize(torch.nn.Linear(4, 4).train(), torch.bfloat16) == "optimized"
    assert calls == [(False, torch.bfloat16)]
