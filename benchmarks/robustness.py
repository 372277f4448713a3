"""
Does the default hold on another machine? The toy acceptance, with train_value.py's and
generate.py's defaults: RE-Control's gain >= 0.5 sd of the base model's per-response reward, at
grammatical >= 95 % of the base model's, for base models pretrained from several seeds and with
torch at 1 and at 2 threads. (The thread count changes the order of floating-point sums, as another
CPU does: the base model, its rollouts and V all come out different.)

    python benchmarks/robustness.py      # 3 pretraining seeds x 2 thread counts, ~45 min on 2 cores
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from worlds import toy  # noqa: E402
from recontrol import learn_and_steer  # noqa: E402


def run_cell(threads, seed, args):
    """Pretrain (or reuse) the base model, then the defaults end to end; every step at `threads`
    threads."""
    torch.set_num_threads(threads)
    out_dir = os.path.join(args.out_dir, f"threads{threads}")
    pretrain = toy.PretrainConfig(seed=seed)
    model, enc = toy.base_model(out_dir, pretrain_config=pretrain)
    folder = os.path.join(out_dir, "base" if seed == 0 else f"base-seed{seed}")
    _, control, _, (base, ctrl), _ = learn_and_steer(model, enc, folder,
                                                     os.path.join(out_dir, f"seed{seed}"),
                                                     seeds=args.seeds)
    gain_sd = (ctrl["reward"] - base["reward"]) / base["reward_sd_responses"]
    grammar_ratio = ctrl["grammatical"] / base["grammatical"]
    return {"threads": threads, "pretrain_seed": seed, "radius": control.radius,
            "base": base, "ctrl": ctrl, "gain_sd": gain_sd, "grammar_ratio": grammar_ratio,
            "passes": gain_sd >= 0.5 and grammar_ratio >= 0.95}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds of the base models")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch thread counts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="sampling seeds of the test runs")
    parser.add_argument("--out-dir", default="out/robustness",
                        help="base models, values and results")
    args = parser.parse_args(argv)
    rows = [run_cell(threads, seed,
                     args) for threads in args.threads for seed in args.pretrain_seeds]
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("\n| threads | pretraining seed | radius | reward base → RE-Control (± seeds) "
          "| gain / sd | grammatical base → RE-Control | KL/token "
          "| perplexity base → RE-Control | passes |\n"
          + "|---" * 9 + "|")
    for r in rows:
        b, c = r["base"], r["ctrl"]
        print(f"| {r['threads']} | {r['pretrain_seed']} | {r['radius']} | {b['reward']:+.3f} → "
              f"{c['reward']:+.3f} (± {max(b['reward_sd_seeds'], c['reward_sd_seeds']):.3f}) | "
              f"{r['gain_sd']:.2f} | {b['grammatical']:.1%} → {c['grammatical']:.1%} | "
              f"{c['kl']:.3f} | {b['perplexity']:.2f} → {c['perplexity']:.2f} | "
              f"{'yes' if r['passes'] else 'NO'} |")
    print(f"{sum(r['passes'] for r in rows)}/{len(rows)} cells pass (gain >= 0.5 sd, grammar >= "
          "95 % of the base's)")


if __name__ == "__main__":
    main()
