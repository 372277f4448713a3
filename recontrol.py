"""
RE-Control (Kong et al., NeurIPS 2024): align a language model at test time by editing its
representation. The whole method on the embedded toy world, top to bottom:

    1. the base model and the task       worlds/toy.py, model.py       E1, E2 (the LM), E4 (R)
    2. rollouts -> V -> its radius        rollouts.py, value.py,        E1, E5, E6, and how strong
                                          train_value.py                E7 may be
    3. RE-Control beside the base model   generate.py, control.py       E3, E7 at every step
    4. the table                          evaluation/                   E8
    5. the trade-off of E7's strength     the same, over alpha * n
Steps 2-4 are one function, learn_and_steer, that the benchmarks call too.

    python recontrol.py   # no downloads; pretrains the base model once (2-5 min), then ~2.5 min
"""

import os
from dataclasses import replace

import worlds
from control import ControlConfig, Controller
from evaluation.harness import Method, evaluate_methods, strength_sweep
from evaluation.report import print_report
from generate import SamplingConfig, response_length
from plumbing.checkpoints import check_dtype_and_device
from plumbing.cli import add_device_arguments, checked, new_parser, run_cli
from plumbing.files import Lock, check_overwrite, read_jsonl_made_by, write_jsonl
from train_value import CalibrationConfig, TrainingConfig, build_value
from value import ValueConfig
from worlds import toy


def sampling_for_test_prompts(model, enc, samples_per_prompt):
    """How the test prompts are sampled: as long as the context allows (<= 128 tokens), in batches
    of 64."""
    return SamplingConfig(max_new_tokens=response_length(model, enc, toy.World().test_prompts()),
                          samples_per_prompt=samples_per_prompt)


def learn_and_steer(model, enc, model_id, out_dir, training=TrainingConfig(), rollouts=None,
                    rollouts_per_prompt=48, seeds=(0, 1, 2), samples_per_prompt=4, overwrite=False):
    """Steps 2 to 4 on the toy world: rollouts of `model` on the training prompts (into `rollouts`,
    by default out_dir/rollouts) -> V (trained as `training` says, saved to out_dir/value.pt) -> the
    radius of E7; then the base model and RE-Control on the held-out test prompts,
    samples_per_prompt for each of the sampling `seeds`. Files that another job made in out_dir are
    replaced only with `overwrite`. Returns (V, its ControlConfig, its training history, the two
    summary rows, every test response)."""
    world = toy.World()
    train_prompts = world.train_prompts()
    rollout_sampling = SamplingConfig(max_new_tokens=response_length(model, enc, train_prompts),
                                      samples_per_prompt=rollouts_per_prompt)
    value, checkpoint, history = build_value(model, enc, train_prompts, "toy",
                                             os.path.join(out_dir, "value.pt"),
                                             rollouts or os.path.join(out_dir, "rollouts"),
                                             rollout_sampling,
                                             ValueConfig(n_embd=model.config.n_embd), training,
                                             CalibrationConfig(), model_id, overwrite=overwrite)
    control = ControlConfig.chosen(checkpoint["control"])
    print("\nRE-Control on held-out test prompts, the base model beside it (mean over seeds, ± "
          "spread):")
    print(f"RE-Control: {control}")
    methods = [Method("base", value=value),
               Method("RE-Control", Controller(value, control), value=value)]
    summaries, records = evaluate_methods(methods, model, enc, world.test_prompts(),
                                          worlds.load_reward("toy"),
                                          sampling_for_test_prompts(model, enc,
                                                                    samples_per_prompt), seeds,
                                          toy.is_grammatical)
    print_report(summaries, records, examples=3)
    return value, control, history, summaries, records


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--model", default="toy",
                        help="toy, toy-long (responses of ~100 tokens), or either with @SEED: "
                             "another pretraining seed")
    parser.add_argument("--out-dir", default=None,
                        help="where rollouts, V and the generations go (default: out/<model>, "
                             "next to its base model)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="sampling seeds of the test runs")
    parser.add_argument("--sweep", type=float, nargs="*",
                        default=[0.0, 8.0, 16.0, 32.0, 64.0, 128.0],
                        help="settings of alpha*n (n fixed) for the reward-vs-fluency tables; "
                             "none to skip")
    parser.add_argument("--samples-per-prompt", type=int, default=4,
                        help="test responses per test prompt and seed")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the rollouts, V and generations in --out-dir that a run "
                             "with other settings made")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    checked(parser, lambda: check_dtype_and_device(args.dtype, args.device))
    name, _, seed = args.model.partition("@")
    if name not in toy.VARIANTS:
        parser.error(f"--model must name a toy world ({', '.join(toy.VARIANTS)}, optionally "
                     f"@SEED), got {args.model!r}")
    out_dir = args.out_dir or os.path.join(toy.VARIANTS[name][0], f"seed{seed}" if seed else "")

    # 1. the base model (pretrained once and cached), the world's prompts split into train and test,
    # its reward
    model, enc = worlds.load_model(args.model, dtype=args.dtype, device=args.device)
    # 2-4. rollouts -> V -> the radius of E7, then the base model and RE-Control on the test prompts
    generations = os.path.join(out_dir, "test_generations.jsonl")
    made_by = {"tool": "recontrol.py", "model": args.model, "seeds": args.seeds,
               "samples_per_prompt": args.samples_per_prompt}
    # one job at a time on the generations (V and its rollouts: build_value's locks)
    with Lock(generations):
        check_overwrite(generations, made_by, read_jsonl_made_by, args.overwrite)
        value, control, _, summaries, records = learn_and_steer(
            model, enc, args.model, out_dir, seeds=args.seeds,
            samples_per_prompt=args.samples_per_prompt, overwrite=args.overwrite)
        write_jsonl(generations, records, made_by)

    # 5. the trade-off: alpha * n from 0 up, without the radius (the paper's E7) and with the
    # calibrated one
    if args.sweep:
        for title, radius in [("The trade-off of E7 as the paper has it (no radius): a stronger "
                               "ascent (alpha * n) buys reward, then falls off a cliff:",
                               float("inf")),
                              ("The same with the calibrated radius: the edit cannot leave the "
                               "neighbourhood of o_t:", control.radius)]:
            bound = replace(control, radius=radius)
            print(f"\n{title}\nRE-Control: {bound}")
            sweep, _ = evaluate_methods(strength_sweep(value, bound, args.sweep), model, enc,
                                        toy.World().test_prompts(), worlds.load_reward("toy"),
                                        sampling_for_test_prompts(model, enc,
                                                                  args.samples_per_prompt),
                                        args.seeds[:1], toy.is_grammatical)
            print_report(sweep)
    return summaries


if __name__ == "__main__":
    run_cli(main)
