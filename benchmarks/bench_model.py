"""
Decode and prefill speed of model.py against transformers' generate, same random GPT-2-small (124M)
weights, same machine, same run: greedy, a 32-token prompt, 64 new tokens, batch 1 and 8.

    python benchmarks/bench_model.py
    python benchmarks/bench_model.py --device cuda --dtype bfloat16 --batch-sizes 1 8 64
"""

import os
import sys
import tempfile

import torch

from timing import apply_threads, benchmark_parser, best_time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing.checkpoints import from_pretrained  # noqa: E402
from generate import SamplingConfig, sample  # noqa: E402


def main(argv=None):
    parser = benchmark_parser(__doc__, new_tokens=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8],
                        help="batch sizes to measure")
    args = parser.parse_args(argv)
    apply_threads(args)

    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config(bos_token_id=None, eos_token_id=None, pad_token_id=0)).eval()
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder)
        ours = from_pretrained(folder, dtype=args.dtype, device=args.device)
    ref.to(dtype=ours.wte.weight.dtype, device=args.device)
    print("GPT-2 small, random weights")
    print(f"{'batch':>5} {'ours tok/s':>11} {'HF tok/s':>10} {'ratio':>6} "
          f"{'ours prefill tok/s':>19} {'HF prefill tok/s':>17}")
    for B in args.batch_sizes:
        prompt = torch.randint(0, 50257, (B, args.prompt_tokens), device=args.device)
        n = args.new_tokens

        def ours_generate():
            sample(ours, prompt.tolist(),
                   SamplingConfig(max_new_tokens=n, temperature=0, eos_ids=[]))

        def hf_generate():
            with torch.no_grad():
                ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0)

        def ours_prefill():
            with torch.no_grad():
                ours.head(ours.states(prompt, ours.new_cache(B, args.prompt_tokens))[:, -1])

        def hf_prefill():
            with torch.no_grad():
                ref(prompt, use_cache=True, logits_to_keep=1)

        t_ours, t_hf = best_time(ours_generate, args.repeats), best_time(hf_generate, args.repeats)
        p_ours, p_hf = best_time(ours_prefill, args.repeats), best_time(hf_prefill, args.repeats)
        tokens, prefill_tokens = B * n, B * args.prompt_tokens
        print(f"{B:>5} {tokens / t_ours:>11.1f} {tokens / t_hf:>10.1f} {t_hf / t_ours:>6.2f} "
              f"{prefill_tokens / p_ours:>19.0f} {prefill_tokens / p_hf:>17.0f}")


if __name__ == "__main__":
    main()
