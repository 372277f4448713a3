"""
RE-Control (Kong et al., NeurIPS 2024): align a language model at test time by editing its representation.
The whole method on the embedded toy world, top to bottom, in five calls:

    1. the base model and the task       toyworld.py, tasks.py      the LM as a dynamical system (E1, E2), R (E4)
    2. rollouts -> V -> its radius        train_value.py             E1, E5, E6, and how strong E7 may be
    3. RE-Control beside the base model   generate.py, control.py    E3, E7 at every decoding step
    4. the table                          metrics.py                 E8
    5. the trade-off of E7's strength     the same, over alpha * n

    python recontrol.py      # no downloads; pretrains the toy base model the first time (2-5 min), then ~2.5 min
"""

import argparse
import os

import toyworld
from cli import run_cli
from control import ControlConfig, Controller
from generate import Method, SamplingConfig, evaluate_methods, print_report, write_jsonl
from tasks import check_prompts_fit, load_model
from train_value import CalibrationConfig, TrainingConfig, build_value
from value import ValueConfig


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

    # 1. the base model (pretrained once and cached), the world's prompts split into train and test, its reward
    model, enc = load_model(args.model)
    world = toyworld.World()
    train_prompts, test_prompts = world.train_prompts(), world.test_prompts()

    # 2. rollouts of the base model on the training prompts -> V by Monte Carlo -> the radius of E7, all stored
    rollout_sampling = SamplingConfig(max_new_tokens=check_prompts_fit(model, enc, train_prompts), samples_per_prompt=48)
    value, checkpoint, _ = build_value(model, enc, train_prompts, "toy", os.path.join(out_dir, "value.pt"),
                                       os.path.join(out_dir, "rollouts"), rollout_sampling,
                                       ValueConfig(n_embd=model.config.n_embd), TrainingConfig(), CalibrationConfig(),
                                       args.model)
    control = ControlConfig.chosen(checkpoint["control"])

    # 3-4. the base model and RE-Control on held-out test prompts, over several sampling seeds
    test_sampling = SamplingConfig(max_new_tokens=check_prompts_fit(model, enc, test_prompts),
                                   samples_per_prompt=args.samples_per_prompt)
    print("\nRE-Control on held-out test prompts, the base model beside it (mean over seeds, ± spread):")
    print(f"RE-Control: {control}")
    methods = [Method("base"), Method("RE-Control", Controller.from_config(value, control))]
    summaries, records = evaluate_methods(methods, model, enc, test_prompts, toyworld.reward, test_sampling,
                                          args.seeds, value, toyworld.is_grammatical)
    print_report(summaries, records, examples=3)
    write_jsonl(os.path.join(out_dir, "test_generations.jsonl"), records)

    # 5. the trade-off: alpha * n from 0 up, without the radius (the paper's E7) and with the calibrated one
    if args.sweep:
        unbounded = ControlConfig(control.step_size, control.n_steps, radius=float("inf"), target=control.target)
        for title, bound in [("The trade-off of E7 as the paper has it (no radius): a stronger ascent (alpha * n) "
                              "buys reward, then falls off a cliff:", unbounded),
                             ("The same with the calibrated radius: the edit cannot leave the neighbourhood of o_t:",
                              control)]:
            print(f"\n{title}\nRE-Control: {bound}")
            methods = [Method(f"alpha*n = {total:g}", Controller.from_config(value, bound.with_total(total)))
                       for total in args.sweep]
            sweep, _ = evaluate_methods(methods, model, enc, test_prompts, toyworld.reward, test_sampling,
                                        args.seeds[:1], value, toyworld.is_grammatical)
            print_report(sweep)
    return summaries


if __name__ == "__main__":
    run_cli(main)
