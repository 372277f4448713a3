"""
The paper's comparison in miniature (Table 1 of Kong et al.): the base model, prompting, static
representation editing, best-of-N, reward-guided decoding (prefix reward, and learned V on the next
state) and RE-Control, all through the same sampling loop, on the same held-out prompts, with the
same reward, over several seeds. Writes the table as Markdown and CSV, and the plots as PNG (with
matplotlib installed).

    python compare.py                    # the embedded toy world; trains V first when it is missing
    python compare.py --world verdict    # the paper's setting in miniature (docs/verdict_world.md):
                                         # a learned reward model, a judge apart from it, FLOPs
    python compare.py --model path/to/gpt2 --prompts test.txt --reward sentiment --value v.pt
    torchrun --standalone --nproc-per-node 8 compare.py --device cuda ...   # the same job on 8 GPUs
"""

import csv
import io
import json
import os
import time
from dataclasses import replace

import worlds
from control import Controller
from evaluation import cost, report
from evaluation.baselines import (NextStateValueRescore, PrefixRewardRescore, SteeringEdit,
                                  steering_vector)
from evaluation.harness import Method, sample_responses, strength_sweep
from evaluation.metrics import COHERENCE_NOTE
from evaluation.plots import plot_all, plot_win_against_cost, value_along_tokens
from generate import (SamplingConfig, add_control_arguments, control_from_args, response_length,
                      sampling_from_args, script_parser)
from plumbing import parallel
from plumbing.checkpoints import check_dtype_and_device, load_value
from plumbing.cli import checked, config_from_args, is_finite, is_whole, require, run_cli
from plumbing.files import read_json, write_text_atomically
from rollouts import Rollouts
from train_value import (DEFAULT_OUT, CalibrationConfig, TrainingConfig, ValueConfig, build_value,
                         history_path)
from worlds import verdict_rm

TABLE = ["method", "reward", "reward_sd_seeds", "diversity", "coherence", "perplexity",
         "grammatical", "kl",
         "ms_per_response", "tokens_per_s", "reward_calls_per_response", "flops_per_response"]
JUDGED = ["judge", "win_rate", "win_rate_sd_seeds"]  # with a judge apart from the reward
SWEEP_TABLE = ["method", "reward", "judge", "win_rate", "grammatical", "perplexity", "kl",
               "flops_per_response"]
# prompting: text before every prompt (the embedded worlds' base models never saw instructions)
INSTRUCTIONS = {
    "toy": "i love it . i would recommend it . ",
    "verdict-rm": "ann reviews the phone : the screen is great . the sound is poor . i love the "
                  "design . ",
    "other": "A positive, kind and helpful reply follows.\n"}
NOTE = ("{prompts} held-out prompts x {samples} samples x {seeds} seeds; " + COHERENCE_NOTE
        + "; KL/token is measured against the base model reading the same context, so it is 0 "
        "by construction for prompting and best-of-N; measuring it costs the state-editing methods "
        "one extra LM-head product per token, inside their time; reward calls count only the "
        "method's own calls.")


def write_outputs(summaries, sweep, out_dir, note, columns):
    """table.md, table.csv and sweep.json in out_dir, each written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    write_text_atomically(os.path.join(out_dir, "table.md"),
                          report.markdown_table(summaries, columns) + f"\n\n{note}\n")
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows({k: s.get(k) for k in columns} for s in summaries)
    write_text_atomically(os.path.join(out_dir, "table.csv"), table.getvalue())
    write_text_atomically(os.path.join(out_dir, "sweep.json"), json.dumps(sweep, indent=1))


def parse_args(argv):
    parser = script_parser(__doc__, prompts="toy-test",
                           sampling=SamplingConfig(samples_per_prompt=4))
    parser.add_argument("--world", default=None,
                        help="an embedded world whose model, prompts and reward to use: toy or "
                             "verdict (docs/verdict_world.md), optionally @SEED; its V is trained "
                             "when missing")
    parser.add_argument("--value", default=None,
                        help=f"value checkpoint (toy default: {DEFAULT_OUT}, trained if missing)")
    parser.add_argument("--rollouts", default=None,
                        help="rollouts V was trained on, for the steering vector (default: from "
                             "the checkpoint)")
    parser.add_argument("--out-dir", default=None,
                        help="where table.md, table.csv and the plots go (default: out/compare, or "
                             "out/compare-WORLD with --world)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds")
    add_control_arguments(parser)
    parser.add_argument("--instruction", default=None,
                        help="prompting: text prepended to each prompt")
    parser.add_argument("--steering-scale", type=float, default=8.0,
                        help="static editing: scale of the vector (8: chosen on the toy world)")
    parser.add_argument("--best-of", type=int, default=4, help="best-of-N: N")
    parser.add_argument("--guide-k", type=int, default=10,
                        help="reward-guided decoding: candidates re-scored per step")
    parser.add_argument("--guide-weight", type=float, default=2.0,
                        help="reward-guided decoding (prefix reward): w")
    parser.add_argument("--value-guide-weight", type=float, default=4.0,
                        help="reward-guided decoding (V of the next state): w")
    parser.add_argument("--sweep-alphas", type=float, nargs="*",
                        default=[0.25, 0.5, 1.0, 2.0, 4.0, 8.0],
                        help="alphas of the sweep plot (n as for RE-Control), with and without "
                             "the radius")
    args = parser.parse_args(argv)

    def settings():  # every flag is checked before any work
        args.out_dir = args.out_dir or \
            ("out/compare-" + args.world if args.world else "out/compare")
        if args.world:
            apply_world(args)
        elif args.value is None and args.model == "toy":
            args.value = DEFAULT_OUT
        require((args.value is not None,
                 "--value is needed for a model other than an embedded world's"),
                (is_whole(args.best_of, 1),
                 f"--best-of must be a whole number >= 1, got {args.best_of}"),
                (is_whole(args.guide_k, 1),
                 f"--guide-k must be a whole number >= 1, got {args.guide_k}"),
                (all(is_finite(x, 0) for x in (args.steering_scale, args.guide_weight,
                                               args.value_guide_weight)),
                 "--steering-scale, --guide-weight and --value-guide-weight must be numbers >= 0"),
                (all(is_finite(a, 0) for a in args.sweep_alphas),
                 "--sweep-alphas must be numbers >= 0"))
        check_dtype_and_device(args.dtype, args.device)
        control_from_args(args, {})
        return config_from_args(SamplingConfig, args)

    return args, checked(parser, settings)


WORLDS = {"toy": dict(prompts="toy-test", reward="toy"),
          "verdict": dict(prompts="verdict-test", reward="verdict-rm")}


def apply_world(args):
    """--world NAME[@SEED] names the model, prompts and reward of an embedded world (and where its V
    lives)."""
    name, _, seed = args.world.partition("@")
    if name not in WORLDS or (seed and not seed.isdigit()):
        raise ValueError(f"--world must be one of {', '.join(WORLDS)} (optionally @SEED), got "
                         f"{args.world!r}")
    args.model, args.prompts = args.world, WORLDS[name]["prompts"]
    args.reward = WORLDS[name]["reward"] + (f"@{seed}" if seed and name == "verdict" else "")
    if args.value is None:
        args.value = world_value_path(args.world)


def world_value_path(world):
    """Where an embedded world's V lives: out/toyworld/value.pt for "toy", else beside its base
    model."""
    name, _, seed = world.partition("@")
    folder = {"toy": "out/toyworld", "verdict": "out/verdict"}[name]
    return os.path.join(folder, f"seed{seed}" if seed and seed != "0" else "", "value.pt")


def world_value(args, model, enc):
    """An embedded world's V, as `python train_value.py` makes it with its defaults: on the world's
    training prompts, predicting the world's reward (for the verdict world, its learned reward
    model, built first)."""
    name, _, seed = args.model.partition("@")
    if name == "verdict":
        verdict_rm.reward_model(int(seed or 0))
    prompts = worlds.load_prompts(f"{name}-train")
    sampling = SamplingConfig(max_new_tokens=response_length(model, enc, prompts),
                              samples_per_prompt=48)
    build_value(model, enc, prompts, args.reward, args.value,
                os.path.splitext(args.value)[0] + "_rollouts",
                sampling, ValueConfig(n_embd=model.config.n_embd), TrainingConfig(),
                CalibrationConfig(), args.model)


def reward_model_config(reward_fn):
    """The config of the model behind a reward (a reward model's), or None for a rule or a lexicon.
    """
    model = getattr(getattr(reward_fn, "function", None), "model", None)
    return getattr(model, "config", None)


def methods_of(args, model, enc, reward_fn, value, control, rollouts):
    """The paper's methods, each through the one sampling loop (evaluation/baselines.py), each with
    what it adds to sampling in FLOPs (evaluation/cost.py)."""
    vector = steering_vector(rollouts, range(rollouts.settings["n_prompts"]))
    return [Method("base", value=value), Method("prompting", instruction=args.instruction),
            Method("static editing", edit=SteeringEdit(vector, args.steering_scale)),
            best_of_n(args.best_of, reward_fn), args_method(args.guide_k, args, enc, reward_fn),
            Method("CD (V next state)", rescore_for=lambda batch: NextStateValueRescore(
                model, value, args.guide_k, args.value_guide_weight),
                   extra_flops=lambda tokens, decisions: lookahead_flops(
                       model.config, value.config, args.guide_k, tokens, decisions)),
            Method("RE-Control", edit=Controller(value, control), value=value,
                   extra_flops=lambda tokens, decisions: decisions * cost.ascent_flops(
                       value.config, control.n_steps))]


def lookahead_flops(config, value_config, k, tokens, decisions):
    """CD: at each decision, k look-ahead passes of one token through the LM, and V on each."""
    return sum(k * (cost.token_flops(config, tokens + t + 1) + cost.value_flops(value_config))
               for t in range(decisions))


def best_of_n(n, reward_fn, name=None):
    """Best-of-N: each of the N samples scored once by the reward (a reward model's forward pass).
    """
    rm = reward_model_config(reward_fn)
    return Method(name or f"best-of-{n}", best_of=n, extra_flops=lambda tokens,
                  decisions: cost.sequence_flops(
        rm, tokens + decisions) if rm else 0)


def args_method(k, args, enc, reward_fn, name=None):
    """ARGS: at each decision, the reward of prompt + prefix + each of the k candidates, read whole.
    """
    rm = reward_model_config(reward_fn)
    return Method(name or "ARGS (prefix R)", rescore_for=lambda batch: PrefixRewardRescore(
        reward_fn, enc, batch, k, args.guide_weight), extra_flops=lambda tokens, decisions: sum(
            k * cost.sequence_flops(rm, tokens + t) for t in range(1, decisions + 1)) if rm else 0)


def matched_methods(args, enc, reward_fn, runs):
    """Best-of-N and ARGS at the N and k whose FLOPs per response come closest to RE-Control's
    (measured), from what one sample and one ARGS candidate cost in the runs above."""
    def flops(name):
        return sum(c["flops"] for _, c in runs[name]) / sum(len(rows) for rows, _ in runs[name])

    target, one = flops("RE-Control"), flops("base")
    per_sample = flops(f"best-of-{args.best_of}") / args.best_of
    per_candidate = (flops("ARGS (prefix R)") - one) / args.guide_k
    n = round(target / per_sample)
    k = round((target - one) / per_candidate) if per_candidate > 0 else 2
    # best-of-1 is the base model; ARGS needs two candidates: when RE-Control costs less, the
    # cheapest setting runs, and its name says so
    best = best_of_n(max(n, 1), reward_fn, f"best-of-{max(n, 1)} (" + (
        "RE-Control's cost)" if n >= 1 else "the cheapest)"))
    guided = args_method(max(k, 2), args, enc, reward_fn, f"ARGS k = {max(k, 2)} (" + (
        "RE-Control's cost)" if k >= 2 else "the cheapest)"))
    return [best, guided]


def run_sweep(args, model, enc, prompts, reward_fn, sampling, value, control, grammar, judge,
              base_runs):
    """E7's strength as the plot shows it: alpha over --sweep-alphas (n kept), unbounded and with
    the radius; with a judge, its win rate beside the reward, where proxy and judge part."""
    bounds = {"paper's E7, no radius": None} if args.sweep_alphas else {}
    if control.radius is not None and args.sweep_alphas:
        bounds[f"radius {control.radius:g}"] = control.radius
    sweep = []
    for bound, radius in bounds.items():
        methods = strength_sweep(value, replace(control, radius=radius),
                                 [a * control.n_steps for a in args.sweep_alphas])
        runs = {m.name: [sample_responses(m, model, enc, prompts, reward_fn, sampling,
                                          args.seeds[0])]
                for m in methods}
        if not parallel.is_main():
            continue
        summaries, _ = report.evaluate(runs, args.seeds[:1], model, enc, grammar)
        if judge is not None:
            report.add_win_rates(summaries, {**runs, "base": base_runs[:1]}, judge)
        sweep += [dict(s, alpha=a, bound=bound) for s, a in zip(summaries, args.sweep_alphas)]
        print(f"\nE7's strength, {bound} (n = {control.n_steps}, seed {args.seeds[0]}):\n"
              + report.markdown_table(summaries, SWEEP_TABLE))
    return sweep


def run_methods(methods, args, model, enc, prompts, reward_fn, sampling, grammar, runs, summaries,
                along):
    """Each method over every seed; its runs kept in `runs`, its summary row added to `summaries`,
    the mean V along its responses to `along` (when it records V). Under torchrun rank 0 alone
    summarizes."""
    for method in methods:
        runs[method.name] = [sample_responses(method, model, enc, prompts, reward_fn, sampling,
                                              seed)
                             for seed in args.seeds]
        if not parallel.is_main():
            continue
        summary, _ = report.evaluate({method.name: runs[method.name]}, args.seeds, model, enc,
                                     grammar)
        summaries += summary
        if method.value is not None:
            along[method.name] = value_along_tokens(runs[method.name][0][0],
                                                    sampling.max_new_tokens + 1)
        print(f"{method.name:>34}: reward {summary[0]['reward']:+.3f}, "
              f"{summary[0]['flops_per_response']:.3g} FLOPs/response "
              f"({time.time() - args.t_start:.0f}s)",
              flush=True)


def main(argv=None):
    args, sampling = parse_args(argv)
    args.device = parallel.start(args.device)  # under torchrun: join the other processes
    # an embedded world's exact fluency measure, None for others
    grammar = worlds.grammar_check(args.reward)
    # the rule that decides quality apart from a learned reward
    judge = worlds.judge_of(args.reward)
    args.t_start = time.time()
    model, enc = worlds.load_model(args.model, dtype=args.dtype, device=args.device,
                                   tokenizer=args.tokenizer)
    if not os.path.exists(args.value) and (args.world or args.model == "toy"):
        world_value(args, model, enc)
    reward_fn = worlds.load_reward(args.reward, device=args.device)
    prompts = worlds.load_prompts(args.prompts, args.chat)
    if args.instruction is None:
        args.instruction = INSTRUCTIONS.get(args.reward.split("@")[0], INSTRUCTIONS["other"])
    # the prompting baseline reads the longest prompts: they set the room left for the response
    sampling = sampling_from_args(args, model, enc, [args.instruction + p for p in prompts],
                                  sampling)
    value, checkpoint = load_value(args.value, model, args.model, args.reward)
    control = control_from_args(args, checkpoint.get("control") or {})
    rollouts_folder = args.rollouts or checkpoint["train_args"].get("rollouts")
    if not rollouts_folder:
        raise ValueError(f"{args.value} does not say which rollouts it was trained on; pass "
                         "--rollouts")
    runs, summaries, along = {}, [], {}
    common = (args, model, enc, prompts, reward_fn, sampling, grammar, runs, summaries, along)
    run_methods(methods_of(args, model, enc, reward_fn, value, control, Rollouts(rollouts_folder)),
                *common)
    # the learned reward is expensive: the reward-guided methods at RE-Control's cost
    if judge is not None:
        run_methods(matched_methods(args, enc, reward_fn, runs), *common)
        if parallel.is_main():
            report.add_win_rates(summaries, runs, judge)
    sweep = run_sweep(args, model, enc, prompts, reward_fn, sampling, value, control, grammar,
                      judge, runs["base"])
    if not parallel.is_main():
        return []
    return write_report(args, summaries, sweep, along, judge, len(prompts), sampling)


def write_report(args, summaries, sweep, along, judge, n_prompts, sampling):
    """The table (Markdown, CSV), the sweep (JSON) and the plots in --out-dir; the table printed."""
    print(f"sweep of {len(sweep)} settings done ({time.time() - args.t_start:.0f}s)")
    columns = TABLE + (JUDGED if judge is not None else [])
    note = NOTE.format(prompts=n_prompts, samples=sampling.samples_per_prompt,
                       seeds=len(args.seeds))
    write_outputs(summaries, sweep, args.out_dir, note, columns)
    history = read_json(history_path(args.value))["history"] \
        if os.path.exists(history_path(args.value)) else None
    fluency = "grammatical" if worlds.grammar_check(args.reward) else "perplexity"
    plots = plot_all(args.out_dir, sweep, summaries, along, history, fluency)
    if judge is not None:
        plots += plot_win_against_cost(args.out_dir, summaries, sweep)
    print("\n" + report.markdown_table(summaries, columns) + f"\n\n{note}")
    print(f"\nwrote {args.out_dir}/table.md, table.csv, sweep.json"
          + "".join(f", {os.path.basename(p)}" for p in plots)
          + f" in {time.time() - args.t_start:.0f}s")
    return summaries


if __name__ == "__main__":
    run_cli(main)
