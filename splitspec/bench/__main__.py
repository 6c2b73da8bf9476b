"""`make bench`: splitspec against target-only decoding, Hugging Face assisted generation and the ideal, on the
same prompts, over a sweep of acceptance rates (demo pairs, `splitspec.demo_models`) and draft lengths k.

    python -m splitspec.bench             # the sweep (under 10 minutes on 2 cores)
    python -m splitspec.bench --quick     # a smoke run on tiny models (CI)
    python -m splitspec.bench --device cuda   # GPU timing with a 7B-shaped target (skipped without a GPU)
    python -m splitspec.bench --target-device cuda   # the sweep with the target server on the GPU

Each pair also runs the goodput block-size schedule (--num-speculative-tokens-schedule goodput) at the largest k,
against the best constant k and target-only.

After the sweep, the modes (splitspec/bench/modes.py; --no-modes skips them): pipelined vs sequential, adaptive vs
fixed k, and 1/2/4/8 concurrent streams, on the alpha 0.9 pair (--modes-acceptance picks another); then pipelined vs
sequential on the deep-draft pairs at alpha 0.9 and 0.95, where k x draft step ~ verify.

Writes OUTPUT/bench.json, OUTPUT/bench.png and the servers' logs (OUTPUT/logs), and prints a table; exits 1 if any
system's output differed from target-only decoding's or fell back to it. Read the speedups as ratios: the draft and
the target share one small machine here, and the absolute times count only on a GPU.
"""

import argparse
import datetime
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

import torch
import transformers
from splitspec_client import Client

from splitspec import demo_models, launch
from splitspec.bench import grpc_rtt, modes, report, runs
from splitspec.topology import format_cpu_list

PROMPTS = [
    "def parse_args(argv):\n    \"\"\"Parse the command line",
    "class Interpolation:\n    \"\"\"Dummy interpolation that passes the value through",
    "The textwrap module provides some convenience functions,",
    "import os\nimport sys\n\n\ndef main():\n",
]
DEFAULTS = dict(acceptances=[0.5, 0.7, 0.8, 0.9, 0.95], ks=[1, 2, 4, 8], prompts=3, max_new_tokens=96, shape="demo")
QUICK = dict(acceptances=[0.6, 0.9], ks=[2], prompts=1, max_new_tokens=12, shape="tiny")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m splitspec.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Smoke run: tiny models, two alphas, k=2, few tokens.")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cpu: the sweep on this machine. cuda: a 7B-shaped target on the GPU, a 68M-shaped "
                             "draft on the CPU, acceptance forced (see splitspec/bench/cuda.py).")
    parser.add_argument("--target-device", default="cpu", choices=["cpu", "cuda"],
                        help="Where the sweep's target servers (and Hugging Face's models) run. cuda: the target "
                             "process gets two CPUs (one below 4), the draft server the others but one for this "
                             "process's client from 8 CPUs on (launch.split_cpus).")
    parser.add_argument("--target-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="The target's dtype (float32: outputs comparable token for token across systems).")
    parser.add_argument("--acceptances", type=float, nargs="+", help="Alpha knobs of the demo pairs swept.")
    parser.add_argument("--ks", type=int, nargs="+", help="Draft lengths k swept.")
    parser.add_argument("--main-acceptance", type=float, default=None,
                        help="Alpha knob whose per-round breakdown is plotted (default: 0.8 when swept).")
    parser.add_argument("--prompts", type=int, help=f"How many of the {len(PROMPTS)} prompts to run.")
    parser.add_argument("--max-new-tokens", type=int, help="Tokens generated per prompt.")
    parser.add_argument("--no-hf", action="store_true", help="Skip Hugging Face assisted generation.")
    parser.add_argument("--modes", action=argparse.BooleanOptionalAction, default=True,
                        help="After the sweep, compare pipelined vs sequential, adaptive vs fixed k and concurrent "
                             "streams on the alpha 0.9 pair (splitspec/bench/modes.py).")
    parser.add_argument("--modes-acceptance", type=float, default=None,
                        help="Alpha knob of the pair the modes run on (default: 0.9).")
    parser.add_argument("--models-dir", type=pathlib.Path, default=None,
                        help=f"Where demo pairs are cached. Default: {demo_models.default_cache_dir()}.")
    parser.add_argument("--output", type=pathlib.Path, default=pathlib.Path("bench-results"),
                        help="Directory for bench.json and bench.png.")
    return parser


class Progress:
    def __init__(self):
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    transformers.logging.set_verbosity_error()  # assisted generation warns about its own generation_config
    transformers.logging.disable_progress_bar()
    if args.device == "cuda":
        from splitspec.bench.cuda import run_cuda

        return run_cuda(args)
    if args.target_device == "cuda" and not torch.cuda.is_available():
        build_parser().error("--target-device cuda: no CUDA device on this machine")
    config = dict(QUICK if args.quick else DEFAULTS)
    for key in ("acceptances", "ks", "prompts", "max_new_tokens"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    config["main_acceptance"] = args.main_acceptance or (0.8 if 0.8 in config["acceptances"]
                                                         else config["acceptances"][-1])
    # Hugging Face assisted generation runs at one k (it takes as long as splitspec's runs): 4 when swept.
    config["hf_k"] = 4 if 4 in config["ks"] else config["ks"][-1]
    if args.modes:
        config["modes"] = dict(modes.QUICK if args.quick else modes.DEFAULTS)
        if args.modes_acceptance is not None:
            low, high = demo_models.acceptance_range(demo_models.SHAPES[config["shape"]])
            if not low <= args.modes_acceptance <= high:
                build_parser().error(f"--modes-acceptance must be in [{low}, {high}] for the {config['shape']} pairs")
            config["modes"]["acceptance"] = args.modes_acceptance
    progress = Progress()
    try:
        results = sweep(config, args, progress)
    except KeyboardInterrupt:
        print("\nInterrupted; servers stopped.", file=sys.stderr)
        return 130
    json_path = args.output / "bench.json"
    report.write_json(results, json_path)
    print("\n" + report.table(results) + "\n")
    if results["schedules"]:
        print(report.schedule_table(results) + "\n")
    if "modes" in results:
        print(modes.table(results["modes"]) + "\n")
    png = report.plot(results, args.output / "bench.png")
    print(f"wrote {json_path}" + (f" and {png}" if png else " (no plot: matplotlib is not installed)"))
    progress("done")
    # The tables show speeds only: outputs that differ from target-only (or runs that fell back) must not pass
    # unnoticed. bench.json has the rows' same_tokens_as_baseline and fallbacks.
    problems = report.output_problems(results)
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


def sweep(config: dict, args, progress: Progress) -> dict:
    pairs = {}
    for acceptance in config["acceptances"]:
        directory = args.models_dir / demo_models.pair_name(config["shape"], acceptance) if args.models_dir else None
        pairs[acceptance] = demo_models.ensure_pair(acceptance, config["shape"], directory, log=progress)
    first = pairs[config["acceptances"][0]]
    tokenizer = demo_models.build_tokenizer(demo_models.SHAPES[config["shape"]].vocab_size,
                                            demo_models.SHAPES[config["shape"]].text_modules)
    prompts = [tokenizer.encode(text) for text in PROMPTS[: config["prompts"]]]
    all_cpus = sorted(os.sched_getaffinity(0))
    # From 8 CPUs on, the bench's own client threads get a CPU of their own: on the draft's, they would hold up
    # its OpenMP team; on the target's, its event loop.
    server_cpus, client_cpus = (all_cpus[:-1], all_cpus[-1:]) if len(all_cpus) >= 8 else (all_cpus, all_cpus)
    draft_cpus, target_cpus = launch.split_cpus(server_cpus, target_on_gpu=args.target_device == "cuda")
    # Every pair's draft is the same model (the first layer is never scaled): one draft server serves them all.
    draft_model = runs.load_model(first.draft_dir)
    results = {"config": config, "machine": machine(all_cpus, draft_cpus, target_cpus, client_cpus,
                                                    args.target_device, args.target_dtype),
               "baselines": [], "runs": [], "schedules": []}
    # The servers' logs, kept with the results (a run replaces the last one's), where a failure can be looked into.
    log_dir = args.output / "logs"
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir(parents=True)
    progress(f"server logs in {log_dir}")
    os.sched_setaffinity(0, client_cpus)  # the servers pin themselves (or are pinned) to theirs
    draft = None
    try:
        draft = launch.start_draft(first.draft_dir, draft_cpus, log_dir)
        for acceptance, pair in pairs.items():
            # The only compute the target's stats do not carry; measured again for each pair, as the machine's
            # load drifts.
            with runs.on_cpus(draft_cpus):
                draft_step_ns = runs.measure_step_ns(draft_model, prompts[0])
            progress(f"draft step {draft_step_ns / 1e6:.2f} ms on CPUs {format_cpu_list(draft_cpus)}")
            measured, goodput = measure_pair(pair, draft.address, target_cpus, log_dir, prompts, config, args,
                                             progress)
            hf = {} if args.no_hf else measure_hf(pair, target_cpus, prompts, config, args, progress)
            baseline = measured.pop(0)
            results["baselines"].append(report.baseline_row(acceptance, baseline, draft_step_ns))
            results["schedules"].append(report.schedule_row(acceptance, max(config["ks"]), goodput, measured,
                                                            baseline))
            for k, run in measured.items():
                hf_target, hf_assisted = hf.get(0), hf.get(k)
                results["runs"].append(report.speculative_row(acceptance, pair.measured_acceptance, k, run, baseline,
                                                              draft_step_ns, hf_target, hf_assisted))
                row = results["runs"][-1]
                progress(f"  alpha {acceptance:.2f} k={k}: speedup {row['speedup']:.2f}x (ideal "
                         f"{row['ideal_speedup']:.2f}x), measured alpha {row['alpha']:.2f}")
        if "modes" in config:
            results["modes"] = measure_modes(config, args, draft.address, target_cpus, log_dir, prompts, tokenizer,
                                             progress)
            results["modes"]["deep_draft"] = measure_deep_draft(config, args, draft_cpus, target_cpus, log_dir,
                                                                prompts, progress)
        results["grpc_rtt"] = grpc_rtt.measure(draft_cpus, target_cpus)
        rtt = results["grpc_rtt"]
        progress(f"bare gRPC bidi round trip between the halves' CPUs: p50 {rtt['p50_ms']:.2f} ms back to back, "
                 f"{rtt['idle_p50_ms']:.2f} ms after {rtt['idle_ms']:g} ms idle")
    finally:
        launch.stop_all([draft] if draft else [])
        os.sched_setaffinity(0, all_cpus)
    return results


def measure_pair(pair, draft_address: str, target_cpus: list[int], log_dir: pathlib.Path, prompts, config, args,
                 progress) -> tuple[dict, runs.Run]:
    """{k: Run} through the two servers, k = 0 being target-only, and the goodput schedule's Run at the largest k,
    from a second target server (started alongside the first). Systems take turns prompt by prompt."""
    def start(name: str, *extra_args: str):
        return launch.start_target(pair.target_dir, draft_address, target_cpus, log_dir, device=args.target_device,
                                   dtype=args.target_dtype, extra_args=extra_args, name=name)

    servers = {}
    try:
        launch.start_together({"target": lambda: start("target"),
                               "goodput": lambda: start("target-goodput", "--num-speculative-tokens-schedule",
                                                        "goodput")}, servers)
        with (Client(servers["target"].address, timeout=600) as client,
              Client(servers["goodput"].address, timeout=600) as goodput):
            # (client, k) per system; the goodput schedule's key is "goodput".
            systems = {k: (client, k) for k in [0, *config["ks"]]} | {"goodput": (goodput, max(config["ks"]))}
            for system_client, k in systems.values():
                runs.run_splitspec(system_client, prompts[:1], 4, k)  # warm-up: a fresh process is slow at first
            measured = runs.run_interleaved(systems, prompts, config["max_new_tokens"])
        for system, run in measured.items():
            label = f"goodput schedule k<={max(config['ks'])}" if system == "goodput" else f"k={system}"
            progress(f"alpha {pair.acceptance:.2f} splitspec {label}: {run.tokens_per_s:.1f} tok/s"
                     + (f", a block in {run.num_drafts}/{run.rounds} rounds" if system == "goodput" else ""))
        return measured, measured.pop("goodput")
    finally:
        launch.stop_all(list(servers.values()))


def measure_modes(config, args, draft_address: str, target_cpus: list[int], log_dir: pathlib.Path, prompts,
                  tokenizer, progress) -> dict:
    """The modes on the draft server of the sweep (the pairs share their draft model)."""
    options = config["modes"]
    shape = config["shape"]
    directory = args.models_dir / demo_models.pair_name(shape, options["acceptance"]) if args.models_dir else None
    pair = demo_models.ensure_pair(options["acceptance"], shape, directory, log=progress)
    options["max_new_tokens"] = min(options["max_new_tokens"], config["max_new_tokens"])
    options["stream_tokens"] = min(options["stream_tokens"], config["max_new_tokens"])
    modules = demo_models.SHAPES[shape].text_modules
    stream_prompts = demo_models.text_prompts(tokenizer, modules, max(options["concurrency"]), 16).tolist()
    return modes.run_modes(pair, draft_address, target_cpus, log_dir, prompts, stream_prompts, options, progress,
                           args.target_device, args.target_dtype)


def measure_deep_draft(config, args, draft_cpus: list[int], target_cpus: list[int], log_dir: pathlib.Path, prompts,
                       progress) -> dict:
    """Pipelined vs sequential on the deep-draft pairs (their own draft server, beside the sweep's idle one)."""
    options = config["modes"]["deep_draft"]
    pairs = {}
    for acceptance in options["acceptances"]:
        directory = args.models_dir / demo_models.pair_name(options["shape"], acceptance) if args.models_dir else None
        pairs[acceptance] = demo_models.ensure_pair(acceptance, options["shape"], directory, log=progress)
    return modes.run_deep_draft(pairs, draft_cpus, target_cpus, log_dir, prompts, config["modes"], progress,
                                args.target_device, args.target_dtype)


def measure_hf(pair, cpus: list[int], prompts, config, args, progress) -> dict:
    """{0: target alone, hf_k: assisted generation} in this process, on the target server's CPUs and threads: the
    same budget for the target as splitspec's baseline. On a GPU both models run there (assisted generation keeps
    its draft on the target's device)."""
    target_dtype = getattr(torch, args.target_dtype)
    draft_dtype = target_dtype if args.target_device == "cuda" else torch.float32  # as the draft server on a CPU
    target = runs.load_model(pair.target_dir, args.target_device, target_dtype)
    draft = runs.load_model(pair.draft_dir, args.target_device, draft_dtype)
    measured = {}
    with runs.on_cpus(cpus):
        for k in (0, config["hf_k"]):
            runs.run_hf(target, draft if k else None, prompts[:1], 4, k)
            measured[k] = runs.run_hf(target, draft if k else None, prompts, config["max_new_tokens"], k)
            progress(f"alpha {pair.acceptance:.2f} HF {'assisted k=' + str(k) if k else 'target-only'}: "
                     f"{measured[k].tokens_per_s:.1f} tok/s")
    return measured


def machine(all_cpus, draft_cpus, target_cpus, client_cpus, target_device: str = "cpu",
            target_dtype: str = "float32") -> dict:
    return {
        "target_device": torch.cuda.get_device_name() if target_device == "cuda" else "cpu",
        "target_dtype": target_dtype,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpus": format_cpu_list(all_cpus),
        "draft_cpus": format_cpu_list(draft_cpus),
        "target_cpus": format_cpu_list(target_cpus),
        "client_cpus": format_cpu_list(client_cpus),
        "hf_cpus": format_cpu_list(target_cpus),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": source_commit(),
    }


def source_commit() -> str:
    """The commit of the code measured (with -dirty for uncommitted changes), so that a README quoting a run can be
    checked against its bench.json; "unknown" outside a git checkout."""
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7", "--exclude=*"],
                                   capture_output=True, text=True, timeout=10,
                                   cwd=pathlib.Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return described.stdout.strip() if described.returncode == 0 and described.stdout.strip() else "unknown"


if __name__ == "__main__":
    sys.exit(main())
