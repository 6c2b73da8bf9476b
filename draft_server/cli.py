"""`splitspec-draft`: the draft server. Pins itself to CPUs / a NUMA node, loads the draft model, serves DraftService."""

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading

from splitspec import server_cli
from splitspec.server_cli import add_common_flags, error
from splitspec.topology import parse_cpu_list

log = logging.getLogger("splitspec.draft")
PROG = "splitspec-draft"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve a draft model on the CPU for splitspec target servers (gRPC DraftService).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="Hugging Face causal LM: a local directory or a hub id.")
    add_common_flags(parser, default_port=50052)
    parser.add_argument("--cpus", type=parse_cpu_list, default=None,
                        help="CPUs to pin to, e.g. 0-15 or 0-7,16-23, within those this process may run on (taskset, "
                             "cpuset). Default: the NUMA node's CPUs, else all online CPUs, that it may run on.")
    parser.add_argument("--numa-node", type=int, default=None,
                        help="NUMA node to bind memory to (and to take CPUs from when --cpus is not given).")
    parser.add_argument("--threads", type=int, default=None, help="Torch intra-op threads. Default: one per pinned CPU.")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="Weights dtype. auto: bfloat16 where AMX is present, else the faster of float32 and "
                             "bfloat16 as measured at start-up.")
    parser.add_argument("--backend", default="torch", choices=["torch", "ipex"],
                        help="torch: stock PyTorch (oneDNN uses AMX for bf16 by itself). ipex: "
                             "intel-extension-for-pytorch, which must match the installed torch.")
    parser.add_argument("--max-num-speculative-tokens", type=int, default=16,
                        help="Largest block a target may ask for.")
    parser.add_argument("--max-draft-support", type=int, default=1024,
                        help="When sampling, each draft distribution is sent as its most likely N tokens "
                             "(renormalized; the draft samples from exactly that), bounding message size.")
    parser.add_argument("--max-sessions", type=int, default=256,
                        help="Open sessions beyond which new ones get RESOURCE_EXHAUSTED. Reported in Info: a target "
                             "opens no more here, and decodes alone meanwhile.")
    parser.add_argument("--exit-when-stdin-closes", action="store_true",
                        help="Shut down when standard input reaches end of file. A parent process that starts this "
                             "server as its worker (splitspec.LLM) holds the other end, so the server never outlives "
                             "it, even when the parent is killed.")
    parser.add_argument("--remove-when-stdin-closes", metavar="DIR", default=None,
                        help="With --exit-when-stdin-closes and a unix:// --host whose socket is directly in DIR: "
                             "remove the socket and DIR (left empty) at end of standard input. splitspec.LLM makes DIR "
                             "for its worker and removes it on close; this cleans up after a parent that was killed.")
    return parser


def flags_problem(args) -> str | None:
    """What is wrong with the flags, or None."""
    return server_cli.flags_problem(args, [
        (args.max_num_speculative_tokens >= 1, "--max-num-speculative-tokens must be at least 1"),
        (args.max_draft_support >= 1, "--max-draft-support must be at least 1"),
        (args.max_sessions >= 1, "--max-sessions must be at least 1"),
    ])


def _owned_socket(args) -> str:
    """The socket in --remove-when-stdin-closes DIR; ValueError unless the flags name one socket directly in DIR."""
    from splitspec.grpc_server import unix_socket_path

    socket = unix_socket_path(args.host)
    if not args.exit_when_stdin_closes or socket is None or (
        os.path.dirname(os.path.abspath(socket)) != os.path.abspath(args.remove_when_stdin_closes)
    ):
        raise ValueError("--remove-when-stdin-closes DIR needs --exit-when-stdin-closes and a --host unix:// socket "
                         "directly in DIR")
    return os.path.abspath(socket)


def _remove_socket_directory(socket: str) -> None:
    """Remove the socket, then its directory if that is left empty: never a tree, in case DIR holds more than the
    parent made it for."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket)
    try:
        os.rmdir(os.path.dirname(socket))
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove the socket's directory: %s", exc)


def _exit_when_stdin_closes(owned_socket: str | None) -> None:
    """SIGTERM ourselves at end of input: the usual graceful shutdown, or the default exit before it is set up.
    With `owned_socket`, remove it and its directory first: the parent that made them is gone."""

    def watch():
        # The raw descriptor, not sys.stdin: a daemon thread blocked on a buffered reader aborts interpreter shutdown.
        while os.read(0, 4096):
            pass
        if owned_socket is not None:
            _remove_socket_directory(owned_socket)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from splitspec.grpc_server import configure_logging

    configure_logging(args.log_level, args.log_format)
    owned_socket = None
    if args.remove_when_stdin_closes is not None:
        try:
            owned_socket = _owned_socket(args)
        except ValueError as exc:
            return error(PROG, exc)
    if args.exit_when_stdin_closes:
        _exit_when_stdin_closes(owned_socket)
    from splitspec import topology
    from splitspec.server_cli import load_security

    # Settings are checked before the model loads, which can take minutes (the model and addresses come after).
    if problem := flags_problem(args):
        return error(PROG, problem)
    try:
        security = load_security(args)
    except ValueError as exc:
        return error(PROG, exc)
    machine = topology.read_topology()
    try:
        plan = topology.plan_pinning(machine, args.cpus, args.numa_node, args.threads)
    except ValueError as exc:
        return error(PROG, exc)
    # Pin before loading: the weights are allocated on the bound node only if the policy is set first.
    pinning = topology.apply_pinning(plan)
    isa = topology.best_isa(machine.cpu_flags)

    from draft_server.cpu_backend import choose_dtype, load_backend
    from splitspec.errors import SplitspecError

    try:
        backend = load_backend(args.backend)
        dtype = choose_dtype(args.dtype, isa)
    except (SplitspecError, ValueError) as exc:
        return error(PROG, exc)
    log.info("CPUs %s, NUMA node %s, %d threads, ISA %s, dtype %s, backend %s",
             topology.format_cpu_list(pinning.cpus), pinning.numa_node, pinning.threads, isa, dtype, backend.name)
    return asyncio.run(_serve(args, security, machine, pinning, isa, backend, dtype))


async def _serve(args, security, machine, pinning, isa, backend, dtype) -> int:
    import torch
    from draft_server.engine import DraftEngine, DraftLimits
    from draft_server.servicer import DraftServerDescription, DraftServicer
    from splitspec import models, topology
    from prometheus_client import CollectorRegistry

    from splitspec.grpc_server import ListenError
    from splitspec.metrics import DraftMetrics
    from splitspec.server_cli import build_runner, build_server, cannot_listen

    try:
        model = models.load_causal_lm(args.model, torch.device("cpu"), dtype)
    except (OSError, ValueError) as exc:
        return error(PROG, f"--model {args.model}: cannot load it: {exc}")
    model = backend.optimize(model, dtype)
    vocabulary = models.vocabulary_of(model, models.load_tokenizer(args.model, required=False))
    limits = DraftLimits(
        max_num_speculative_tokens=args.max_num_speculative_tokens,
        max_context_tokens=models.max_context_tokens(model),
        max_draft_support=args.max_draft_support,
        max_sessions=args.max_sessions,
    )
    registry = CollectorRegistry()
    metrics = DraftMetrics(registry)
    engine = DraftEngine(build_runner(model, log), vocabulary, limits, metrics, max_batch_size=args.max_num_seqs,
                         max_batch_tokens=args.max_num_batched_tokens)
    metrics.live_sessions.set_function(lambda: engine.live_sessions)
    description = DraftServerDescription(
        model=args.model,
        dtype=str(dtype).removeprefix("torch."),
        backend=backend.name,
        isa=isa,
        isa_flags=topology.inference_isa_flags(machine.cpu_flags),
        pinned_cpus=list(pinning.cpus),
        numa_node=pinning.numa_node,
        threads=pinning.threads,
        pinning_notes=pinning.notes,
    )
    try:
        server = build_server(args, registry, security)
    except ListenError as exc:
        return cannot_listen(PROG, exc)
    server.add_service("splitspec.v1.DraftService", DraftServicer(engine, description))

    async def on_stop():
        engine.shutdown()

    await server.run(grace_s=args.shutdown_grace, on_stop=on_stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
