"""
What RE-Control costs on the toy world's base model: sampling alone, sampling that records o_0 ... o_T for
value training, and controlled sampling (E7) for a few numbers of gradient steps n.

    python benchmarks/bench_recontrol.py      # needs the toy base model (python toyworld.py makes it)
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import toyworld  # noqa: E402
from generate import SamplingConfig, sample  # noqa: E402
from control import Controller  # noqa: E402
from value import ValueConfig, ValueFunction  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64, help="prompts sampled together")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported")
    args = parser.parse_args(argv)
    model, enc = toyworld.base_model()
    prompts = [enc.encode(p) for p in toyworld.World().test_prompts()]
    prompts = (prompts * (args.batch_size // len(prompts) + 1))[:args.batch_size]
    value = ValueFunction(ValueConfig(n_embd=model.config.n_embd)).requires_grad_(False)

    def timed(**kwargs):
        best, tokens = float("inf"), 0
        for r in range(args.repeats + 1):  # the first run warms up
            t0 = time.perf_counter()
            out = sample(model, prompts, SamplingConfig(max_new_tokens=32), tokenizer=enc, seed=r, **kwargs)
            if r:
                best = min(best, time.perf_counter() - t0)
                tokens = sum(len(t) for t in out.tokens)
        return tokens / best

    plain = timed()
    print(f"toy base model, batch {args.batch_size}, {torch.get_num_threads()} threads")
    print(f"{'sampling':>28}: {plain:8.0f} tokens/s")
    recorded = timed(record_states=True)
    print(f"{'recording o_0..o_T':>28}: {recorded:8.0f} tokens/s  ({plain / recorded - 1:+.1%} time)")
    for n in (1, 10, 20, 30):
        controlled = timed(edit=Controller(value, 0.1, n))
        print(f"{f'RE-Control, n = {n}':>28}: {controlled:8.0f} tokens/s  ({plain / controlled:.1f}x the time)")


if __name__ == "__main__":
    main()
