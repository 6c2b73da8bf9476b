"""How the draft model runs on the CPU: which dtype (`--dtype`) and which kernel library (`--backend`)."""

from __future__ import annotations

import importlib.metadata
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from splitspec.errors import FailedPrecondition
from splitspec.models import DTYPES

logger = logging.getLogger(__name__)


def measure_matmul_seconds(dtype: torch.dtype, size: int = 512, repeats: int = 5) -> float:
    """Median seconds of one size×size matmul in `dtype`: a few milliseconds that tell whether this CPU's kernels
    make bf16 pay (native bf16 dot products) or cost (emulated through fp32 conversions)."""
    a = torch.randn(size, size).to(dtype)  # [size, size]
    b = torch.randn(size, size).to(dtype)  # [size, size]
    torch.matmul(a, b)  # warm-up: the first call pays for kernel selection and packing buffers
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def choose_dtype(
    requested: str, isa: str, measure: Callable[[torch.dtype], float] | None = None
) -> torch.dtype:
    """Resolve `--dtype`: a named dtype as given; "auto" picks bfloat16 on AMX and otherwise whichever of float32 and
    bfloat16 `measure` (seconds per matmul) finds faster here."""
    if requested in DTYPES:
        return DTYPES[requested]
    if requested != "auto":
        raise ValueError(f"--dtype {requested!r}: expected one of auto, {', '.join(DTYPES)}")
    if isa == "amx":
        return torch.bfloat16  # oneDNN dispatches bf16 matmuls to AMX tiles by itself; nothing to measure
    measure = measure or measure_matmul_seconds
    fp32_s, bf16_s = measure(torch.float32), measure(torch.bfloat16)
    chosen = torch.bfloat16 if bf16_s < fp32_s else torch.float32  # a tie keeps the more precise dtype
    logger.info("--dtype auto: float32 %.2f ms, bfloat16 %.2f ms per matmul -> %s", fp32_s * 1e3, bf16_s * 1e3, chosen)
    return chosen


class CpuBackend(Protocol):
    name: str

    def optimize(self, model: Any, dtype: torch.dtype) -> Any: ...


@dataclass(frozen=True)
class TorchBackend:
    """Stock torch: oneDNN already picks AVX2/AVX-512/AMX kernels at run time."""

    name: str = "torch"

    def optimize(self, model: Any, dtype: torch.dtype) -> Any:
        return model


@dataclass(frozen=True)
class IpexBackend:
    ipex: Any  # the imported intel_extension_for_pytorch module
    name: str = "ipex"

    def optimize(self, model: Any, dtype: torch.dtype) -> Any:
        return self.ipex.optimize(model.eval(), dtype=dtype)


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


_IPEX_ADVICE = (
    "ipex only works with the torch major.minor it was built for, and its last release, 2.8.0 (archived upstream), "
    "needs torch 2.8: install `torch==2.8.* intel-extension-for-pytorch==2.8.0` in a separate environment, "
    "or use --backend torch (stock torch 2.13 matched ipex 2.8 on a 68M Llama)"
)


def _load_ipex() -> IpexBackend:
    torch_version = torch.__version__
    try:
        # Read the version before importing: ipex exits the process at import time when torch does not match.
        ipex_version = importlib.metadata.version("intel-extension-for-pytorch")
    except importlib.metadata.PackageNotFoundError:
        raise FailedPrecondition(
            f"--backend ipex: intel-extension-for-pytorch is not installed (torch {torch_version} is); {_IPEX_ADVICE}"
        ) from None
    if _major_minor(ipex_version) != _major_minor(torch_version):
        raise FailedPrecondition(
            f"--backend ipex: intel-extension-for-pytorch {ipex_version} is installed beside torch {torch_version}; "
            f"{_IPEX_ADVICE}"
        )
    try:
        import intel_extension_for_pytorch as ipex
    except ImportError as exc:
        raise FailedPrecondition(
            f"--backend ipex: intel-extension-for-pytorch {ipex_version} failed to import ({exc}); {_IPEX_ADVICE}"
        ) from exc
    return IpexBackend(ipex)


def load_backend(name: str) -> CpuBackend:
    if name == "torch":
        return TorchBackend()
    if name == "ipex":
        return _load_ipex()
    raise ValueError(f"--backend {name!r}: expected one of torch, ipex")
