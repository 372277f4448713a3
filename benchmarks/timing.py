"""What the speed benchmarks share: the best of a few timed runs after a warm-up (waiting for the
GPU, if any, to finish), and their flags."""

import argparse
import time

import torch


def benchmark_parser(doc, new_tokens):
    """A parser with the flags every speed benchmark has: the shape of the job, the repeats and the
    threads."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=32,
                        help="prompt tokens per row (random prompts)")
    parser.add_argument("--new-tokens", type=int, default=new_tokens,
                        help="tokens generated per row")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repeats after a warm-up; the best is reported")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for a GPU")
    parser.add_argument("--dtype", default="float32",
                        help="dtype of the model: float32, bfloat16 or float16")
    return parser


def apply_threads(args):
    """Set torch's threads; print what the numbers were measured on."""
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}, {args.dtype}, torch {torch.__version__}")


def best_time(fn, repeats):
    """The shortest wall time of `repeats` calls of fn(), after one call that warms up."""
    return best_times({"": fn}, repeats)[""]


def best_times(fns, repeats):
    """{name: the shortest wall time of `repeats` calls of fn} for a dict of fns, after one warm-up
    call each. The calls take turns (round after round), so a slow spell of a shared machine slows
    every fn, not one alone."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize()
            t0 = time.perf_counter()
            fn()
            synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}


def synchronize():
    """Wait for the GPU's queued work (a no-op without one), so that a time is the work's, not its
    queueing's."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
