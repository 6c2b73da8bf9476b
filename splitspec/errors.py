"""Domain errors and their gRPC status codes: the one place where a failure gets its status.

Engine code raises these; `splitspec.grpc_server` turns them into a gRPC status for every RPC it serves.
Anything else that escapes an RPC is a bug and becomes INTERNAL.
"""

import grpc


class SplitspecError(Exception):
    """Base of every error a user can act on. `code` is the gRPC status it is sent with."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(SplitspecError):
    """A request field is malformed or out of range. The message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


class FailedPrecondition(SplitspecError):
    """The request is well-formed but cannot be served in this state (e.g. vocabulary mismatch, message out of order)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class NotFound(SplitspecError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(SplitspecError):
    """A configured limit is reached; the caller may retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(SplitspecError):
    """The server is shutting down or a dependency is gone."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(SplitspecError):
    """No valid credentials (bearer token) came with the call."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(SplitspecError):
    """The caller is known (client certificate) but not allowed to call this server."""

    code = grpc.StatusCode.PERMISSION_DENIED
