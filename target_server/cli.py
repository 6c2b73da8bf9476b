"""`splitspec-target`: the target server, front door for clients. Verifies blocks from draft servers."""

import argparse
import asyncio
import logging
import sys

log = logging.getLogger("splitspec.target")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitspec-target",
        description="Serve a target model (GPU, else CPU) with speculative decoding against CPU draft servers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="Hugging Face causal LM: a local directory or a hub id.")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer directory or hub id. Default: --model.")
    parser.add_argument("--draft", action="append", default=[], metavar="HOST:PORT",
                        help="A draft server; repeat for several (sessions go to the least busy connected one). "
                             "None: the target decodes alone, with the same output.")
    parser.add_argument("--host", default="0.0.0.0", help="Address to listen on.")
    parser.add_argument("--port", type=int, default=50051, help="Port to listen on (0 picks a free one and logs it).")
    parser.add_argument("--device", default="auto", help="auto (cuda when present, else cpu), cpu, cuda, cuda:N.")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="Weights dtype. auto: bfloat16 on GPUs that support it (else float16), float32 on CPU.")
    parser.add_argument("--num-speculative-tokens", type=int, default=4,
                        help="Draft tokens per verification round, when a request does not say.")
    parser.add_argument("--max-num-speculative-tokens", type=int, default=16,
                        help="Largest num_speculative_tokens a request may ask for.")
    parser.add_argument("--draft-timeout", type=float, default=10.0,
                        help="Seconds to wait for a draft block before the session falls back to target-only.")
    parser.add_argument("--draft-probe-interval", type=float, default=2.0,
                        help="Seconds between health probes (Info) of each connected draft server; a failed one is "
                             "probed again after this, doubling up to --draft-max-backoff.")
    parser.add_argument("--draft-max-backoff", type=float, default=30.0,
                        help="Longest wait, in seconds, between probes of a draft server that keeps failing.")
    parser.add_argument("--max-draft-reopens", type=int, default=2,
                        help="Times a request may move to another (or a recovered) draft server after its draft "
                             "session fails, before it finishes on the target alone.")
    parser.add_argument("--threads", type=int, default=None, help="Torch intra-op threads (CPU target).")
    parser.add_argument("--log-level", default="info", help="Logging level.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from splitspec.grpc_server import configure_logging

    configure_logging(args.log_level)
    if not 0 <= args.num_speculative_tokens <= args.max_num_speculative_tokens:
        print("splitspec-target: error: --num-speculative-tokens must be in [0, --max-num-speculative-tokens]",
              file=sys.stderr)
        return 2
    from splitspec import models

    try:
        device = models.resolve_device(args.device)
        dtype = models.resolve_dtype(args.dtype, device)
    except (ValueError, RuntimeError) as exc:
        print(f"splitspec-target: error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(args, device, dtype))


async def _serve(args, device, dtype) -> int:
    import torch
    from splitspec_client.v1 import target_pb2_grpc

    from splitspec import models
    from splitspec.grpc_server import GrpcServer
    from splitspec.kv_cache import CausalLMRunner
    from target_server.draft_pool import DraftPool
    from target_server.engine import TargetEngine
    from target_server.request import Limits
    from target_server.servicer import TargetServicer

    if args.threads:
        torch.set_num_threads(args.threads)
    model = models.load_causal_lm(args.model, device, dtype)
    tokenizer = models.load_tokenizer(args.tokenizer or args.model, required=True)
    vocabulary = models.vocabulary_of(model, tokenizer)
    pool = DraftPool(args.draft, vocabulary, probe_interval_s=args.draft_probe_interval,
                     max_backoff_s=args.draft_max_backoff)
    await pool.start()
    engine = TargetEngine(CausalLMRunner(model), tokenizer, vocabulary, pool, args.draft_timeout,
                          max_draft_reopens=args.max_draft_reopens)
    limits = Limits(
        vocab_size=vocabulary.vocab_size,
        max_context_tokens=models.max_context_tokens(model),
        num_speculative_tokens=args.num_speculative_tokens,
        max_num_speculative_tokens=args.max_num_speculative_tokens,
    )
    server = GrpcServer(args.host, args.port)
    servicer = TargetServicer(engine, limits, args.model, str(dtype).removeprefix("torch."))
    server.add_service("splitspec.v1.TargetService", target_pb2_grpc.add_TargetServiceServicer_to_server, servicer)

    async def on_stop():
        await pool.close()
        engine.shutdown()

    await server.run(on_stop=on_stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
