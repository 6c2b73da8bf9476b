"""TLS, mutual TLS and bearer tokens: what a server demands of its callers and what a caller presents.

The draft server can be closed to everyone but the target: mutual TLS with a CA that signs only the target's
certificate, optionally narrowed to certificate names (`--allowed-client-names`), and/or a shared bearer token.
"""

import dataclasses
import hmac
import pathlib
import ssl

import grpc

from splitspec.errors import PermissionDenied, Unauthenticated


def _read(path: str | None, flag: str) -> bytes | None:
    if not path:
        return None
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag} {path}: {exc.strerror or exc}") from exc


def _ssl_reason(exc: ssl.SSLError) -> str:
    return exc.reason.lower().replace("_", " ") if exc.reason else "not PEM"


def _check_tls_files(cert: str | None, key: str | None, ca: str | None, flags: tuple[str, str, str]) -> None:
    """Fail now, naming the flag, on a certificate, key or CA that TLS cannot use (`flags`: the cert's, the key's
    and the CA's): grpc takes any bytes here, then fails when binding the port, saying only that, or at the first
    handshake."""
    cert_flag, key_flag, ca_flag = flags
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for path, flag in ((cert, cert_flag), (ca, ca_flag)):
        if path:
            try:
                context.load_verify_locations(cafile=path)
            except ssl.SSLError as exc:
                raise ValueError(f"{flag} {path}: not a usable TLS certificate ({_ssl_reason(exc)})") from exc
    if cert:
        try:
            # An empty password: an encrypted key fails here rather than prompting (grpc cannot use one either).
            context.load_cert_chain(cert, key, password=b"")
        except ssl.SSLError as exc:
            raise ValueError(f"{key_flag} {key}: not a usable TLS private key of {cert_flag} {cert} "
                             f"({_ssl_reason(exc)})") from exc


def read_token(path: str | None, flag: str = "token file") -> str | None:
    """A bearer token from a file, so it never shows in `ps` or shell history: the file's one line (surrounding
    whitespace and a final newline ignored)."""
    if not path:
        return None
    token = _read(path, flag).decode(errors="replace").strip()
    if not token:
        raise ValueError(f"{flag} {path} is empty")
    if len(token.splitlines()) > 1:
        raise ValueError(f"{flag} {path} holds more than one line: the token must be one line")
    return token


@dataclasses.dataclass(frozen=True)
class ServerSecurity:
    tls_cert: bytes | None = None  # PEM chain; None serves plaintext
    tls_key: bytes | None = None
    client_ca: bytes | None = None  # PEM; when set, callers must present a certificate it signed (mutual TLS)
    token: str | None = None  # when set, calls must carry `authorization: Bearer <token>`
    allowed_client_names: frozenset[str] = frozenset()  # certificate CN/SAN allowed; empty allows any CA-signed one

    @classmethod
    def from_files(cls, cert: str | None, key: str | None, client_ca: str | None, token_file: str | None,
                   allowed_client_names: list[str] | None = None) -> "ServerSecurity":
        if bool(cert) != bool(key):
            raise ValueError("--tls-cert and --tls-key go together")
        if client_ca and not cert:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        if allowed_client_names and not client_ca:
            raise ValueError("--allowed-client-names needs --tls-client-ca: names come from client certificates")
        security = cls(_read(cert, "--tls-cert"), _read(key, "--tls-key"), _read(client_ca, "--tls-client-ca"),
                       read_token(token_file, "--auth-token-file"), frozenset(allowed_client_names or ()))
        _check_tls_files(cert, key, client_ca, ("--tls-cert", "--tls-key", "--tls-client-ca"))
        return security

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert is None:
            return None
        return grpc.ssl_server_credentials([(self.tls_key, self.tls_cert)], root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)

    def authorize(self, context) -> None:
        """Raise Unauthenticated / PermissionDenied unless the call meets this policy."""
        if self.token is not None:
            metadata = dict(context.invocation_metadata() or ())
            scheme, _, credentials = metadata.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer":  # auth schemes are case-insensitive (RFC 7235)
                raise Unauthenticated("missing bearer token: send metadata 'authorization: Bearer <token>'")
            if not hmac.compare_digest(credentials.strip().encode(), self.token.encode()):
                raise Unauthenticated("invalid bearer token")
        if self.allowed_client_names:
            auth = context.auth_context()
            names = {n.decode() for key in ("x509_common_name", "x509_subject_alternative_name")
                     for n in auth.get(key, [])}
            if not names & self.allowed_client_names:
                raise PermissionDenied(f"client certificate {sorted(names)} is not allowed to call this server")


@dataclasses.dataclass(frozen=True)
class ClientSecurity:
    """What a caller (the target, calling its draft servers) presents."""

    root_ca: bytes | None = None  # PEM; set to use TLS
    cert: bytes | None = None  # client certificate, for mutual TLS
    key: bytes | None = None
    token: str | None = None

    @classmethod
    def from_files(cls, ca: str | None, cert: str | None, key: str | None, token_file: str | None) -> "ClientSecurity":
        if bool(cert) != bool(key):
            raise ValueError("--draft-tls-cert and --draft-tls-key go together")
        if cert and not ca:
            raise ValueError("--draft-tls-cert needs --draft-tls-ca")
        security = cls(_read(ca, "--draft-tls-ca"), _read(cert, "--draft-tls-cert"), _read(key, "--draft-tls-key"),
                       read_token(token_file, "--draft-auth-token-file"))
        _check_tls_files(cert, key, ca, ("--draft-tls-cert", "--draft-tls-key", "--draft-tls-ca"))
        return security

    def channel(self, address: str, options) -> grpc.aio.Channel:
        if self.root_ca is None:
            return grpc.aio.insecure_channel(address, options=options)
        credentials = grpc.ssl_channel_credentials(self.root_ca, self.key, self.cert)
        return grpc.aio.secure_channel(address, credentials, options=options)

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()
