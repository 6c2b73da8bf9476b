"""splitspec client SDK: talk to a splitspec target server over gRPC. Needs no torch.

`Client` blocks, `AsyncClient` runs on asyncio; both return the immutable types of `splitspec_client.types` and
raise the typed exceptions of `splitspec_client.errors`.
"""

from . import errors
from .aio import AsyncClient
from .client import Client
from .errors import (
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SplitspecError,
    UnauthenticatedError,
    UnavailableError,
)
from .types import (
    DraftServerStatus,
    FinishReason,
    GenerationResult,
    GenerationStats,
    RoundTiming,
    StreamChunk,
    TargetInfo,
    VocabularyInfo,
)

__all__ = [
    "AsyncClient",
    "CancelledError",
    "Client",
    "DeadlineExceededError",
    "DraftServerStatus",
    "FailedPreconditionError",
    "FinishReason",
    "GenerationResult",
    "GenerationStats",
    "RoundTiming",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "SplitspecError",
    "StreamChunk",
    "TargetInfo",
    "UnauthenticatedError",
    "UnavailableError",
    "VocabularyInfo",
    "errors",
]
