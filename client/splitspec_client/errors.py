"""Typed exceptions for the gRPC status a splitspec server answers with, so callers catch by meaning, not by code.

The server puts a message a user can act on in the status details (INVALID_ARGUMENT names the field); it is kept
as `details` and shown by str().
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc


class SplitspecError(Exception):
    """A failed call to a splitspec server. `code` is the gRPC status, `details` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None):
        # Both go into args so that the exception survives pickling (e.g. across multiprocessing).
        super().__init__(details, code)
        self.details = details
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class InvalidArgumentError(SplitspecError):
    """A request field is malformed or out of range; `details` names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPreconditionError(SplitspecError):
    """The request is well-formed but the server cannot serve it in its present state."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class NotFoundError(SplitspecError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhaustedError(SplitspecError):
    """A server limit is reached; retrying later may succeed."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(SplitspecError):
    """The server cannot be reached or is shutting down; retrying may succeed."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(SplitspecError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnauthenticatedError(SplitspecError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(SplitspecError):
    code = grpc.StatusCode.PERMISSION_DENIED


class CancelledError(SplitspecError):
    code = grpc.StatusCode.CANCELLED


class InternalError(SplitspecError):
    """A bug on the server side; the details are worth reporting."""

    code = grpc.StatusCode.INTERNAL


_ERROR_BY_CODE: dict[grpc.StatusCode, type[SplitspecError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        FailedPreconditionError,
        NotFoundError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        UnauthenticatedError,
        PermissionDeniedError,
        CancelledError,
        InternalError,
    )
}


def from_rpc_error(err: grpc.RpcError) -> SplitspecError:
    """The typed exception for a failed RPC; codes without a class of their own give a plain SplitspecError."""
    # grpc.RpcError itself declares no code()/details(); the errors grpc raises are also Call objects that do.
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    return _ERROR_BY_CODE.get(code, SplitspecError)(details, code)


@contextlib.contextmanager
def raising_typed_errors() -> Iterator[None]:
    """Re-raise a grpc.RpcError from the block as its typed SplitspecError (the RpcError stays as __cause__)."""
    try:
        yield
    except grpc.RpcError as err:
        raise from_rpc_error(err) from err
