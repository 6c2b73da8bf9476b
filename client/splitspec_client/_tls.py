"""The --tls-ca, --tls-cert and --tls-key options, and the channel credentials they make: the same for the `splitspec`
command and the health probe."""

from __future__ import annotations

import argparse
import os
import pathlib

import grpc


def add_tls_options(parser: argparse.ArgumentParser, environment_prefix: str | None = None) -> None:
    """Add the TLS options. With `environment_prefix`, each defaults to an environment variable: the prefix, then
    TLS_CA, TLS_CERT or TLS_KEY (an empty one counts as unset)."""
    options = [
        ("--tls-ca", "connect with TLS, verifying the server with this CA certificate (default: plaintext)"),
        ("--tls-cert", "client certificate, for servers that require mutual TLS (with --tls-key); connects with "
                       "TLS, verifying the server with the system's CA certificates unless --tls-ca is given"),
        ("--tls-key", "private key of --tls-cert"),
    ]
    for flag, help_text in options:
        default = None
        if environment_prefix is not None:
            variable = environment_prefix + flag[2:].upper().replace("-", "_")
            default = os.environ.get(variable) or None
            help_text += f" (environment: {variable})"
        parser.add_argument(flag, metavar="PEM", default=default, help=help_text)


def channel_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials from the options' PEM files; None (plaintext) when none is given. Raises ValueError naming the
    option for a file that cannot be read, or for a certificate without its key."""
    if not (args.tls_ca or args.tls_cert or args.tls_key):
        return None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key: give both or neither")

    def read(flag: str, path: str | None) -> bytes | None:
        try:
            return pathlib.Path(path).read_bytes() if path else None
        except OSError as err:
            raise ValueError(f"{flag}: {err}") from None

    return grpc.ssl_channel_credentials(
        read("--tls-ca", args.tls_ca), read("--tls-key", args.tls_key), read("--tls-cert", args.tls_cert)
    )
