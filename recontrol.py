"""
RE-Control (Kong et al., NeurIPS 2024): align a language model at test time by editing its representation.
The whole method on the embedded toy world, as the user's scripts run it, one after the other:

    train_value.py   rollouts of the base model (E1) -> rewards (E4) -> V by TD(lambda) (E5, E6) -> the radius of E7
    generate.py      the base model and RE-Control (E7, control.py) side by side on the test prompts (E8)

    python recontrol.py      # no downloads; pretrains the toy base model the first time (2-5 min), then ~2.5 min
"""

import argparse
import os

import generate as generate_script
import toyworld
import train_value
from tasks import run_cli


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy",
                        help="toy, toy-long (responses of ~100 tokens), or either with @SEED: another pretraining seed")
    parser.add_argument("--out-dir", default=None,
                        help="where rollouts, V and the generations go (default: out/<model>, next to its base model)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds of the test runs")
    parser.add_argument("--sweep", type=float, nargs="*", default=[0.0, 8.0, 16.0, 32.0, 64.0, 128.0],
                        help="settings of alpha*n (n fixed) for the reward-vs-fluency tables; none to skip")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="test responses per test prompt and seed")
    args = parser.parse_args(argv)
    name, _, seed = args.model.partition("@")
    if name not in toyworld.VARIANTS:
        parser.error(f"--model must name a toy world ({', '.join(toyworld.VARIANTS)}, optionally @SEED), got {args.model!r}")
    out_dir = args.out_dir or os.path.join(toyworld.VARIANTS[name][0], f"seed{seed}" if seed else "")

    value_path = os.path.join(out_dir, "value.pt")
    train_value.main(["--model", args.model, "--out", value_path, "--rollouts", os.path.join(out_dir, "rollouts")])
    common = ["--model", args.model, "--prompts", "toy-test", "--reward", "toy", "--value", value_path,
              "--samples-per-prompt", str(args.samples_per_prompt)]
    print("\nRE-Control on held-out test prompts, the base model beside it (mean over seeds, ± spread):")
    summaries = generate_script.main(common + ["--seeds", *map(str, args.seeds),
                                               "--out", os.path.join(out_dir, "test_generations.jsonl")])
    if args.sweep:
        sweep = common + ["--sweep", *map(str, args.sweep), "--seeds", str(args.seeds[0])]
        print("\nThe trade-off of E7 as the paper has it (no radius): a stronger ascent (alpha * n) buys reward, then "
              "falls off a cliff:")
        generate_script.main(sweep + ["--radius", "inf"])
        print("\nThe same with the calibrated radius: the edit cannot leave the neighbourhood of o_t:")
        generate_script.main(sweep)
    return summaries


if __name__ == "__main__":
    run_cli(main)
