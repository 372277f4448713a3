"""
What RE-Control costs: sampling alone, sampling that records o_0 ... o_T for value training, and controlled
sampling (E7) for a few numbers of gradient steps n; on the toy world's base model, or on random weights of the
shape of any preset of model.py (GPT-2 small, Llama ...).

    python benchmarks/bench_recontrol.py                                      # the toy base model (made if missing)
    python benchmarks/bench_recontrol.py --preset gpt2 --batch-size 1 --prompt-tokens 32 --new-tokens 64
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import toyworld  # noqa: E402
from model import GPT, GPTConfig, PRESETS  # noqa: E402
from generate import SamplingConfig, sample  # noqa: E402
from control import Controller  # noqa: E402
from value import ValueConfig, ValueFunction  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64, help="prompts sampled together")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported")
    parser.add_argument("--preset", default=None, choices=list(PRESETS),
                        help="random weights of this shape instead of the toy base model")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="with --preset: random prompt length")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per response")
    args = parser.parse_args(argv)
    if args.preset:
        torch.manual_seed(0)
        model, enc = GPT(GPTConfig.preset(args.preset)).eval(), None
        prompts = torch.randint(model.config.vocab_size, (args.batch_size, args.prompt_tokens)).tolist()
    else:
        model, enc = toyworld.base_model()
        prompts = [enc.encode(p) for p in toyworld.World().test_prompts()]
        prompts = (prompts * (args.batch_size // len(prompts) + 1))[:args.batch_size]
    value = ValueFunction(ValueConfig(n_embd=model.config.n_embd)).requires_grad_(False)

    eos_ids = [] if args.preset else None  # random weights: every response runs its full length

    def timed(**kwargs):
        best, tokens = float("inf"), 0
        for r in range(args.repeats + 1):  # the first run warms up
            t0 = time.perf_counter()
            out = sample(model, prompts, SamplingConfig(max_new_tokens=args.new_tokens, eos_ids=eos_ids), tokenizer=enc,
                         seed=r, **kwargs)
            if r:
                best = min(best, time.perf_counter() - t0)
                tokens = sum(len(t) for t in out.tokens)
        return tokens / best

    plain = timed()
    print(f"{args.preset or 'toy'} base model, batch {args.batch_size}, {torch.get_num_threads()} threads")
    print(f"{'sampling':>28}: {plain:8.0f} tokens/s")
    recorded = timed(record_states=True)
    print(f"{'recording o_0..o_T':>28}: {recorded:8.0f} tokens/s  ({plain / recorded - 1:+.1%} time)")
    for n in (1, 10, 20, 30):
        controlled = timed(edit=Controller(value, 0.1, n))
        print(f"{f'RE-Control, n = {n}':>28}: {controlled:8.0f} tokens/s  ({plain / controlled:.1f}x the time)")


if __name__ == "__main__":
    main()
