"""
What RE-Control costs: sampling alone, sampling that records o_0 ... o_T for value training, and
controlled sampling (E7) for a few numbers of gradient steps n, with V's gradient in closed form
(the default) and by autograd; on the toy world's base model, or on random weights of the shape of
any preset of model.py (GPT-2 small, Llama ...).

    python benchmarks/bench_recontrol.py          # the toy base model (made if missing)
    python benchmarks/bench_recontrol.py --preset gpt2 --batch-size 1 --prompt-tokens 32 \
        --new-tokens 64
    python benchmarks/bench_recontrol.py --preset llama-2-7b --device cuda --dtype bfloat16 \
        --batch-size 16
"""

import os
import sys

import torch

from timing import apply_threads, benchmark_parser, best_times

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from worlds import toy  # noqa: E402
from plumbing.formats import resolve_dtype  # noqa: E402
from model import GPT, GPTConfig, PRESETS  # noqa: E402
from generate import SamplingConfig, sample  # noqa: E402
from control import ControlConfig, Controller  # noqa: E402
from plumbing.checkpoints import load_value  # noqa: E402
from value import ValueConfig, ValueFunction  # noqa: E402


def setting_up(args):
    """(model, tokenizer or None, prompts as token ids, V): random weights of --preset's shape, or
    the toy base model; a random V, or --value."""
    if args.preset:
        torch.manual_seed(0)
        with torch.device(args.device):  # random weights made where they will run
            model = GPT(GPTConfig.preset(args.preset)).to(resolve_dtype(args.dtype)).eval()
            enc = None
        prompts = torch.randint(model.config.vocab_size,
                                (args.batch_size, args.prompt_tokens)).tolist()
    else:
        model, enc = toy.base_model()
        model.to(dtype=resolve_dtype(args.dtype), device=args.device)
        prompts = [enc.encode(p) for p in toy.World().test_prompts()]
        prompts = (prompts * (args.batch_size // len(prompts) + 1))[:args.batch_size]
    if args.value:
        value, _ = load_value(args.value, model)
    else:
        value = ValueFunction(ValueConfig(n_embd=model.config.n_embd)).to(args.device)
        value.requires_grad_(False)
    return model, enc, prompts, value


def main(argv=None):
    parser = benchmark_parser(__doc__, new_tokens=32)
    parser.add_argument("--batch-size", type=int, default=64, help="prompts sampled together")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 10, 20, 30],
                        help="values of n to time")
    parser.add_argument("--value", default=None,
                        help="a value checkpoint for the model (default: a random V)")
    parser.add_argument("--target", type=float, default=None,
                        help="also time the control that stops each row once V reaches this value")
    parser.add_argument("--preset", default=None, choices=list(PRESETS),
                        help="random weights of this shape instead of the toy base model")
    args = parser.parse_args(argv)
    apply_threads(args)
    model, enc, prompts, value = setting_up(args)
    eos_ids = [] if args.preset else None  # random weights: every response runs its full length

    config = SamplingConfig(max_new_tokens=args.new_tokens, eos_ids=eos_ids)
    n = args.steps[-1]
    settings = {"sampling": {}, "recording o_0..o_T": dict(record_states=True),
                **{f"RE-Control, n = {k}": dict(edit=Controller(value, ControlConfig(0.1, k)))
                   for k in args.steps},
                # a plain callable: the autograd path
                f"n = {n}, autograd gradient": dict(edit=Controller(lambda o: value(o),
                                                                    ControlConfig(0.1, n)))}
    if args.target is not None:  # a row stops climbing once V reaches the target
        target = ControlConfig(0.1, n, target=args.target)
        settings[f"n = {n}, target V {args.target:g}"] = dict(edit=Controller(value, target))
    tokens = {name: sum(len(t) for t in sample(model, prompts, config, tokenizer=enc, seed=0,
                                               **kwargs).tokens)
              for name, kwargs in settings.items()}
    runs = {name: lambda kwargs=kwargs: sample(model, prompts, config, tokenizer=enc, seed=0,
                                               **kwargs) for name, kwargs in settings.items()}
    times = best_times(runs, args.repeats)  # interleaved, round after round
    rate = {name: tokens[name] / times[name] for name in settings}  # tokens per second
    print(f"{args.preset or 'toy'} base model, batch {args.batch_size}, the best of "
          f"{args.repeats} interleaved rounds")
    for name in settings:
        ratio = rate['sampling'] / rate[name]
        cost = "" if name == "sampling" else f"  ({ratio:.2f}x the time per token)"
        print(f"{name:>28}: {rate[name]:8.0f} tokens/s{cost}")
    if args.target is not None:
        counted = Controller(value, ControlConfig(0.1, n, target=args.target))
        rows = []  # how many states each step edits
        sample(model, prompts, config, tokenizer=enc, seed=0,
               edit=lambda o: rows.append(o.shape[0]) or counted(o))
        print(f"{'':>28}  with the target: {int(counted.steps_taken) / sum(rows):.1f} of {n} "
              "ascent steps per token on average")

if __name__ == "__main__":
    main()
