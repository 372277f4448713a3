"""
What RE-Control costs: sampling alone, sampling that records o_0 ... o_T for value training, and controlled
sampling (E7) for a few numbers of gradient steps n, with V's gradient in closed form (the default) and by autograd;
on the toy world's base model, or on random weights of the shape of any preset of model.py (GPT-2 small, Llama ...).

    python benchmarks/bench_recontrol.py                                      # the toy base model (made if missing)
    python benchmarks/bench_recontrol.py --preset gpt2 --batch-size 1 --prompt-tokens 32 --new-tokens 64
    python benchmarks/bench_recontrol.py --preset llama-2-7b --device cuda --dtype bfloat16 --batch-size 16
"""

import os
import sys

import torch

from timing import apply_threads, benchmark_parser, best_time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import toyworld  # noqa: E402
from formats import resolve_dtype  # noqa: E402
from model import GPT, GPTConfig, PRESETS  # noqa: E402
from generate import SamplingConfig, sample  # noqa: E402
from control import Controller  # noqa: E402
from value import ValueConfig, ValueFunction, load_value  # noqa: E402


def main(argv=None):
    parser = benchmark_parser(__doc__, new_tokens=32)
    parser.add_argument("--batch-size", type=int, default=64, help="prompts sampled together")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 10, 20, 30], help="values of n to time")
    parser.add_argument("--value", default=None, help="a value checkpoint for the model (default: a random V)")
    parser.add_argument("--target", type=float, default=None,
                        help="also time the control that stops each row once V reaches this value")
    parser.add_argument("--preset", default=None, choices=list(PRESETS),
                        help="random weights of this shape instead of the toy base model")
    args = parser.parse_args(argv)
    apply_threads(args)
    if args.preset:
        torch.manual_seed(0)
        with torch.device(args.device):  # random weights made where they will run
            model, enc = GPT(GPTConfig.preset(args.preset)).to(resolve_dtype(args.dtype)).eval(), None
        prompts = torch.randint(model.config.vocab_size, (args.batch_size, args.prompt_tokens)).tolist()
    else:
        model, enc = toyworld.base_model()
        model.to(dtype=resolve_dtype(args.dtype), device=args.device)
        prompts = [enc.encode(p) for p in toyworld.World().test_prompts()]
        prompts = (prompts * (args.batch_size // len(prompts) + 1))[:args.batch_size]
    if args.value:
        value, _ = load_value(args.value, model)
    else:
        value = ValueFunction(ValueConfig(n_embd=model.config.n_embd)).to(args.device).requires_grad_(False)

    eos_ids = [] if args.preset else None  # random weights: every response runs its full length

    def timed(**kwargs):
        """Tokens per second of sampling the batch with these plug-ins."""
        config = SamplingConfig(max_new_tokens=args.new_tokens, eos_ids=eos_ids)
        tokens = sum(len(t) for t in sample(model, prompts, config, tokenizer=enc, seed=0, **kwargs).tokens)
        return tokens / best_time(lambda: sample(model, prompts, config, tokenizer=enc, seed=0, **kwargs), args.repeats)

    plain = timed()
    print(f"{args.preset or 'toy'} base model, batch {args.batch_size}")
    print(f"{'sampling':>28}: {plain:8.0f} tokens/s")
    recorded = timed(record_states=True)
    print(f"{'recording o_0..o_T':>28}: {recorded:8.0f} tokens/s  ({plain / recorded - 1:+.1%} time)")
    for n in args.steps:
        controlled = timed(edit=Controller(value, 0.1, n))
        print(f"{f'RE-Control, n = {n}':>28}: {controlled:8.0f} tokens/s  ({plain / controlled:.2f}x the time)")
    by_autograd = timed(edit=Controller(lambda o: value(o), 0.1, args.steps[-1]))  # a plain callable: autograd
    print(f"{f'n = {args.steps[-1]}, autograd gradient':>28}: {by_autograd:8.0f} tokens/s  "
          f"({plain / by_autograd:.2f}x the time)")
    if args.target is not None:  # a row stops climbing once V reaches the target
        n = args.steps[-1]
        with_target = timed(edit=Controller(value, 0.1, n, target=args.target))
        counted, rows = Controller(value, 0.1, n, target=args.target), []  # rows: how many states each step edits
        sample(model, prompts, SamplingConfig(max_new_tokens=args.new_tokens, eos_ids=eos_ids), tokenizer=enc, seed=0,
               edit=lambda o: rows.append(o.shape[0]) or counted(o))
        print(f"{f'n = {n}, target V {args.target:g}':>28}: {with_target:8.0f} tokens/s  ({plain / with_target:.2f}x "
              f"the time), {int(counted.steps_taken) / sum(rows):.1f} ascent steps per token on average")


if __name__ == "__main__":
    main()
