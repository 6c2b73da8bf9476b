"""Shared server-side core of splitspec: sampling, speculative math, KV cache, topology, gRPC bootstrap.

Also the vLLM-style offline API, `from splitspec import LLM, SamplingParams` (see `splitspec.llm`). Those names
are imported on first use, so `import splitspec` alone stays light.
"""

_OFFLINE_API = {
    "LLM": "splitspec.llm",
    "SamplingParams": "splitspec.llm_types",
    "RequestOutput": "splitspec.llm_types",
    "CompletionOutput": "splitspec.llm_types",
    "RequestMetrics": "splitspec.llm_types",
}

__all__ = list(_OFFLINE_API)


def __getattr__(name: str):
    if name in _OFFLINE_API:
        import importlib

        return getattr(importlib.import_module(_OFFLINE_API[name]), name)
    raise AttributeError(f"module 'splitspec' has no attribute {name!r}")
