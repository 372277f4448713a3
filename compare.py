"""
The paper's comparison in miniature (Table 1 of Kong et al.): the base model, prompting, static representation
editing, best-of-N, reward-guided decoding (prefix reward, and learned V on the next state) and RE-Control, all
through the same sampling loop, on the same held-out prompts, with the same reward, over several seeds.
Writes the table as Markdown and CSV, and the plots as PNG (with matplotlib installed).

    python compare.py        # the embedded toy world; trains V first when out/toyworld/value.pt is missing
    python compare.py --model path/to/gpt2 --prompts test.txt --reward sentiment --value gpt2_value.pt
    torchrun --standalone --nproc-per-node 8 compare.py --device cuda ...   # the same job on 8 GPUs (parallel.py)
"""

import csv
import io
import json
import os
import time
from dataclasses import replace

import worlds
from control import Controller
from evaluation import report
from evaluation.baselines import NextStateValueRescore, PrefixRewardRescore, SteeringEdit, steering_vector
from evaluation.harness import Method, evaluate_methods, sample_responses, strength_sweep
from evaluation.metrics import COHERENCE_NOTE
from evaluation.plots import plot_all, value_along_tokens
from generate import (SamplingConfig, add_control_arguments, control_from_args, response_length,
                      sampling_from_args, script_parser)
from plumbing import parallel
from plumbing.checkpoints import check_dtype_and_device, load_value
from plumbing.cli import checked, config_from_args, is_finite, is_whole, require, run_cli
from plumbing.files import read_json, write_text_atomically
from rollouts import Rollouts
from train_value import (DEFAULT_OUT, CalibrationConfig, TrainingConfig, ValueConfig, build_value,
                         history_path)

TABLE = ["method", "reward", "reward_sd_seeds", "diversity", "coherence", "perplexity", "grammatical", "kl",
         "ms_per_response", "tokens_per_s", "reward_calls_per_response"]
NOTE = ("{prompts} held-out prompts x {samples} samples x {seeds} seeds; " + COHERENCE_NOTE + "; KL/token is "
        "measured against the base model reading the same context, so it is 0 by construction for prompting and "
        "best-of-N; measuring it costs the state-editing methods one extra LM-head product per token, inside "
        "their time; reward calls count only the method's own calls.")


def write_outputs(summaries, sweep, out_dir, note):
    """table.md, table.csv and sweep.json in out_dir, each written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    write_text_atomically(os.path.join(out_dir, "table.md"),
                          report.markdown_table(summaries, TABLE) + f"\n\n{note}\n")
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=TABLE)
    writer.writeheader()
    writer.writerows({k: s[k] for k in TABLE} for s in summaries)
    write_text_atomically(os.path.join(out_dir, "table.csv"), table.getvalue())
    write_text_atomically(os.path.join(out_dir, "sweep.json"), json.dumps(sweep, indent=1))


def parse_args(argv):
    parser = script_parser(__doc__, prompts="toy-test", sampling=SamplingConfig(samples_per_prompt=4))
    parser.add_argument("--value", default=None,
                        help=f"value checkpoint (toy default: {DEFAULT_OUT}, trained if missing)")
    parser.add_argument("--rollouts", default=None,
                        help="rollouts V was trained on, for the steering vector (default: from the checkpoint)")
    parser.add_argument("--out-dir", default="out/compare", help="where table.md, table.csv and the plots go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds")
    add_control_arguments(parser)
    parser.add_argument("--instruction", default=None, help="prompting: text prepended to each prompt")
    parser.add_argument("--steering-scale", type=float, default=8.0,
                        help="static editing: scale of the vector (8: chosen on the toy world)")
    parser.add_argument("--best-of", type=int, default=4, help="best-of-N: N")
    parser.add_argument("--guide-k", type=int, default=10,
                        help="reward-guided decoding: candidates re-scored per step")
    parser.add_argument("--guide-weight", type=float, default=2.0, help="reward-guided decoding (prefix reward): w")
    parser.add_argument("--value-guide-weight", type=float, default=4.0,
                        help="reward-guided decoding (V of the next state): w")
    parser.add_argument("--sweep-alphas", type=float, nargs="*", default=[0.25, 0.5, 1.0, 2.0, 4.0, 8.0],
                        help="alphas of the sweep plot (n as for RE-Control), with and without the radius")
    args = parser.parse_args(argv)

    def settings():  # every flag is checked before any work
        require((args.value is not None or args.model == "toy",
                 "--value is needed for a model other than the toy world's"),
                (is_whole(args.best_of, 1), f"--best-of must be a whole number >= 1, got {args.best_of}"),
                (is_whole(args.guide_k, 1), f"--guide-k must be a whole number >= 1, got {args.guide_k}"),
                (all(is_finite(x, 0) for x in (args.steering_scale, args.guide_weight, args.value_guide_weight)),
                 "--steering-scale, --guide-weight and --value-guide-weight must be numbers >= 0"),
                (all(is_finite(a, 0) for a in args.sweep_alphas),
                 "--sweep-alphas must be numbers >= 0"))
        check_dtype_and_device(args.dtype, args.device)
        control_from_args(args, {})
        return config_from_args(SamplingConfig, args)

    return args, checked(parser, settings)


def toy_value(model, enc):
    """The toy world's value, as `python train_value.py` makes it with its defaults (DEFAULT_OUT)."""
    prompts = worlds.load_prompts("toy-train")
    sampling = SamplingConfig(max_new_tokens=response_length(model, enc, prompts), samples_per_prompt=48)
    build_value(model, enc, prompts, "toy", DEFAULT_OUT, os.path.splitext(DEFAULT_OUT)[0] + "_rollouts",
                sampling, ValueConfig(n_embd=model.config.n_embd), TrainingConfig(), CalibrationConfig(), "toy")
    return DEFAULT_OUT


def methods_of(args, model, enc, reward_fn, value, control, rollouts):
    """The paper's methods, each through the one sampling loop (evaluation/baselines.py)."""
    vector = steering_vector(rollouts, range(rollouts.settings["n_prompts"]))
    return [Method("base", value=value), Method("prompting", instruction=args.instruction),
            Method("static editing", edit=SteeringEdit(vector, args.steering_scale)),
            Method(f"best-of-{args.best_of}", best_of=args.best_of),
            Method("ARGS (prefix R)", rescore_for=lambda batch: PrefixRewardRescore(
                reward_fn, enc, batch, args.guide_k, args.guide_weight)),
            Method("CD (V next state)", rescore_for=lambda batch: NextStateValueRescore(
                model, value, args.guide_k, args.value_guide_weight)),
            Method("RE-Control", edit=Controller(value, control), value=value)]


def run_sweep(args, model, enc, prompts, reward_fn, sampling, value, control, grammar):
    """E7's strength as the plot shows it: alpha over --sweep-alphas (n kept), unbounded and with the radius."""
    bounds = {"paper's E7, no radius": None}
    if control.radius is not None:
        bounds[f"radius {control.radius:g}"] = control.radius
    sweep = []
    for bound, radius in bounds.items():
        alphas = {f"alpha*n = {a * control.n_steps:g}": a for a in args.sweep_alphas}
        methods = strength_sweep(value, replace(control, radius=radius),
                                 [a * control.n_steps for a in args.sweep_alphas])
        summaries, _ = evaluate_methods(methods, model, enc, prompts, reward_fn, sampling, args.seeds[:1], grammar)
        sweep += [dict(s, alpha=alphas[s["method"]], bound=bound) for s in summaries]
        if parallel.is_main():
            print(f"\nE7's strength, {bound} (n = {control.n_steps}, seed {args.seeds[0]}):\n"
                  + report.markdown_table(summaries))
    return sweep


def main(argv=None):
    args, sampling = parse_args(argv)
    args.device = parallel.start(args.device)  # under torchrun: join the other processes
    grammar = worlds.grammar_check(args.reward)  # the toy world's exact fluency measure, None for other rewards
    t_start = time.time()
    reward_fn = worlds.load_reward(args.reward, device=args.device)
    prompts = worlds.load_prompts(args.prompts, args.chat)
    model, enc = worlds.load_model(args.model, dtype=args.dtype, device=args.device)
    if args.instruction is None:
        args.instruction = "i love it . i would recommend it . " if grammar else \
            "A positive, kind and helpful reply follows.\n"
    # the prompting baseline reads the longest prompts: they set the room left for the response
    sampling = sampling_from_args(args, model, enc, [args.instruction + p for p in prompts], sampling)
    if args.value is None:
        args.value = DEFAULT_OUT if os.path.exists(DEFAULT_OUT) else toy_value(model, enc)
    value, checkpoint = load_value(args.value, model, args.model, args.reward)
    control = control_from_args(args, checkpoint.get("control") or {})
    rollouts_folder = args.rollouts or checkpoint["train_args"].get("rollouts")
    if not rollouts_folder:
        raise ValueError(f"{args.value} does not say which rollouts it was trained on; pass --rollouts")
    methods = methods_of(args, model, enc, reward_fn, value, control, Rollouts(rollouts_folder))
    summaries, along = [], {}
    for method in methods:
        runs = [sample_responses(method, model, enc, prompts, reward_fn, sampling, seed) for seed in args.seeds]
        if not parallel.is_main():  # under torchrun, rank 0 alone summarizes and writes
            continue
        summary, _ = report.evaluate({method.name: runs}, args.seeds, model, enc, grammar)
        summaries += summary
        if method.value is not None:
            along[method.name] = value_along_tokens(runs[0][0], sampling.max_new_tokens + 1)
        print(f"{method.name:>18}: reward {summary[0]['reward']:+.3f} ({time.time() - t_start:.0f}s)", flush=True)
    sweep = run_sweep(args, model, enc, prompts, reward_fn, sampling, value, control, grammar)
    if not parallel.is_main():
        return []
    print(f"sweep of {len(sweep)} settings done ({time.time() - t_start:.0f}s)")
    note = NOTE.format(prompts=len(prompts), samples=sampling.samples_per_prompt, seeds=len(args.seeds))
    write_outputs(summaries, sweep, args.out_dir, note)
    history = read_json(history_path(args.value)) if os.path.exists(history_path(args.value)) else None
    plots = plot_all(args.out_dir, sweep, summaries, along, history, "grammatical" if grammar else "perplexity")
    print("\n" + report.markdown_table(summaries, TABLE) + f"\n\n{note}")
    print(f"\nwrote {args.out_dir}/table.md, table.csv, sweep.json"
          + "".join(f", {os.path.basename(p)}" for p in plots) + f" in {time.time() - t_start:.0f}s")
    return summaries


if __name__ == "__main__":
    run_cli(main)
