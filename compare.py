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
import json
import os
import time

import metrics
import parallel
import train_value
from baselines import NextStateValueGuide, PrefixRewardGuide, SteeringEdit, steering_vector
from cli import add_control_arguments, checked, is_finite, is_whole, require, run_cli, script_parser
from control import ControlConfig, Controller
from generate import Method, SamplingConfig, sample_responses
from tasks import (check_prompts_fit, check_task_flags, grammar_check, load_model, load_prompts, load_reward,
                   named_tokens)
from rollouts import Rollouts
from train_value import history_path
from value import load_value


TABLE = ["method", "reward", "reward_sd_seeds", "diversity", "coherence", "perplexity", "grammatical", "kl",
         "ms_per_response", "tokens_per_s", "reward_calls_per_response"]


def write_outputs(summaries, out_dir, note):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(metrics.markdown_table(summaries, TABLE) + f"\n\n{note}\n")
    with open(os.path.join(out_dir, "table.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE)
        writer.writeheader()
        writer.writerows({k: s[k] for k in TABLE} for s in summaries)


def value_along_tokens(rows, length):
    """Mean V(o_t) at each step t over the responses that reach it (rows of sample_responses with a value)."""
    means = []
    for t in range(length):
        reached = [r["values"][t] for r in rows if len(r["values"]) > t]
        if not reached:
            break
        means.append(sum(reached) / len(reached))
    return means


def plot_all(out_dir, sweep, summaries, along, history, fluency_key):
    """The three PNG plots; none (with a note) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    paths = []

    def save(fig, ax, name, title, xlabel, ylabel):
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plot: it hides no point
        paths.append(os.path.join(out_dir, name))
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)

    # the sweeps in black and grey, each alpha written at its point (one sweep to the left, the other to the right,
    # above and below in turn, so they do not collide); each other method a square of its own colour, in the legend
    fig, ax = plt.subplots(figsize=(7, 5))
    sides = [("black", "o", -6, "right"), ("gray", "^", 6, "left")]  # the two sweeps' labels on opposite sides
    for bound, (color, marker, dx, align) in zip(dict.fromkeys(s["bound"] for s in sweep), sides):
        points = sorted((s for s in sweep if s["bound"] == bound), key=lambda s: s["alpha"])
        ax.plot([s[fluency_key] for s in points], [s["reward"] for s in points], marker=marker, color=color,
                label=f"RE-Control, {bound} (alpha grows)")
        near = {}  # points that (nearly) coincide share one label, "α=4, 8"
        for s in points:
            near.setdefault((round(s[fluency_key], 2), round(s["reward"], 2)), []).append(s)
        for i, group in enumerate(near.values()):
            label = "α=" + ", ".join(f"{s['alpha']:g}" for s in group)
            ax.annotate(label, (group[0][fluency_key], group[0]["reward"]), textcoords="offset points",
                        xytext=(dx, 4 if i % 2 else -9), ha=align, fontsize=7, color=color)
    for s, color in zip(summaries, plt.get_cmap("tab10").colors):
        ax.scatter(s[fluency_key], s["reward"], marker="s", s=60, zorder=3, color=color, label=s["method"])
    save(fig, ax, "reward_vs_fluency.png", "Reward against fluency: the alpha sweep of E7, other methods as squares",
         "grammatical fraction" if fluency_key == "grammatical" else "perplexity under the base model", "mean reward")

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in along.items():
        ax.plot(range(len(curve)), curve, "o-", ms=3, label=name)
    save(fig, ax, "value_along_tokens.png", "V(o_t) along generated responses (mean over those that reach step t)",
         "step t of the response", "mean V(o_t)")

    if history:
        fig, ax = plt.subplots(figsize=(7, 4))
        epochs = [h["epoch"] for h in history]
        ax.plot(epochs, [h["train_loss"] for h in history], label="training loss (the method's own)")
        ax.plot(epochs, [h["held_out_loss"] for h in history], label="held-out loss (the method's own)")
        ax.plot(epochs, [h["error"] for h in history], label="held-out error of V(o_t) against the return")
        ax.axhline(history[0]["best_constant"], color="gray", ls=":", label="error of the best constant")
        kept = train_value.kept_epoch(history)
        ax.axvline(kept["epoch"], color="black", ls="--", lw=0.8, label=f"kept: epoch {kept['epoch']}")
        save(fig, ax, "value_training.png", "Value training (E6)", "epoch", "mean squared error")
    return paths


def main(argv=None):
    parser = script_parser(__doc__, prompts="toy-test", sampling=SamplingConfig(samples_per_prompt=4))
    parser.add_argument("--value", default=None,
                        help=f"value checkpoint (toy default: {train_value.DEFAULT_OUT}, trained if missing)")
    parser.add_argument("--rollouts", default=None,
                        help="rollouts V was trained on, for the steering vector (default: from the checkpoint)")
    parser.add_argument("--out-dir", default="out/compare", help="where table.md, table.csv and the plots go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds")
    add_control_arguments(parser)
    parser.add_argument("--instruction", default=None, help="prompting: text prepended to each prompt")
    parser.add_argument("--steering-scale", type=float, default=8.0,
                        help="static editing: scale of the vector (8: chosen on the toy world, see README)")
    parser.add_argument("--best-of", type=int, default=4, help="best-of-N: N")
    parser.add_argument("--guide-k", type=int, default=10, help="reward-guided decoding: candidates re-scored per step")
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
                 "--steering-scale, --guide-weight and --value-guide-weight must be numbers >= 0"))
        check_task_flags(args)
        ControlConfig.chosen({}, args.step_size, args.n_steps, args.radius, args.target, args.l2)
        for alpha in args.sweep_alphas:
            ControlConfig(step_size=alpha)  # each checked like --step-size
        return SamplingConfig.from_args(args)

    sampling = checked(parser, settings)
    args.device = parallel.start(args.device)  # under torchrun: join the other processes
    grammar = grammar_check(args.reward)  # the toy world's exact fluency measure, None for other rewards
    t_start = time.time()
    reward_fn = load_reward(args.reward, device=args.device)
    prompts = load_prompts(args.prompts, args.chat)
    model, enc = load_model(args.model, dtype=args.dtype, device=args.device)
    instruction = args.instruction if args.instruction is not None else (
        "i love it . i would recommend it . " if grammar else "A positive, kind and helpful reply follows.\n")
    # the prompting baseline reads the longest prompts: they set the room left for the response
    sampling.max_new_tokens = check_prompts_fit(model, enc, [instruction + p for p in prompts], sampling.max_new_tokens)
    sampling.eos_ids = named_tokens(enc, args.eos) if args.eos else None
    if args.value is None:
        args.value = train_value.DEFAULT_OUT
        if not os.path.exists(args.value):
            train_value.main([])  # the toy world's value, as `python train_value.py` makes it
    value, checkpoint = load_value(args.value, model, args.model, args.reward)
    control = ControlConfig.chosen(checkpoint.get("control") or {}, args.step_size, args.n_steps, args.radius,
                                   args.target, args.l2)
    rollouts_folder = args.rollouts or checkpoint["train_args"].get("rollouts")
    if not rollouts_folder:
        raise ValueError(f"{args.value} does not say which rollouts it was trained on; pass --rollouts")
    rollouts = Rollouts(rollouts_folder)

    vector = steering_vector(rollouts, range(rollouts.settings["n_prompts"]))
    methods = [Method("base", value=value), Method("prompting", instruction=instruction),
               Method("static editing", edit=SteeringEdit(vector, args.steering_scale)),
               Method(f"best-of-{args.best_of}", best_of=args.best_of),
               Method("ARGS (prefix R)",
                      guide=lambda p, r: PrefixRewardGuide(r, enc, p, args.guide_k, args.guide_weight)),
               Method("CD (V next state)", guide=lambda p, r: NextStateValueGuide(model, value, args.guide_k,
                                                                                   args.value_guide_weight)),
               Method("RE-Control", edit=Controller.from_config(value, control), value=value)]
    summaries, along = [], {}
    for method in methods:
        runs = [sample_responses(method, model, enc, prompts, reward_fn, sampling, seed) for seed in args.seeds]
        if not parallel.is_main():  # under torchrun, rank 0 alone summarizes and writes
            continue
        summaries.append(metrics.summarize_runs(method.name, runs, model, enc, grammar))
        if method.value is not None:
            along[method.name] = value_along_tokens(runs[0][0], sampling.max_new_tokens + 1)
        print(f"{method.name:>18}: reward {summaries[-1]['reward']:+.3f} ({time.time() - t_start:.0f}s)", flush=True)

    sweep = []
    bounds = {"paper's E7, no radius": None}
    if control.radius is not None:
        bounds[f"radius {control.radius:g}"] = control.radius
    for bound, radius in bounds.items():
        for alpha in args.sweep_alphas:
            controller = Controller(value, alpha, control.n_steps, radius=radius, target=control.target)
            runs = [sample_responses(Method("sweep", edit=controller), model, enc, prompts, reward_fn, sampling,
                                     args.seeds[0])]
            if parallel.is_main():
                sweep.append(dict(metrics.summarize_runs("sweep", runs, model, enc, grammar), alpha=alpha, bound=bound))
    if not parallel.is_main():
        return []
    print(f"sweep of {len(sweep)} settings done ({time.time() - t_start:.0f}s)")

    note = (f"{len(prompts)} held-out prompts x {sampling.samples_per_prompt} samples x {len(args.seeds)} seeds; "
            f"{metrics.COHERENCE_NOTE}; KL/token is measured against the base model reading the same context, so it "
            "is 0 by construction for prompting and best-of-N; measuring it costs the state-editing methods one extra "
            "LM-head product per token, inside their time; reward calls count only the method's own calls.")
    write_outputs(summaries, args.out_dir, note)
    with open(os.path.join(args.out_dir, "sweep.json"), "w") as f:
        json.dump(sweep, f, indent=1)
    history = None
    if os.path.exists(history_path(args.value)):
        with open(history_path(args.value)) as f:
            history = json.load(f)
    plots = plot_all(args.out_dir, sweep, summaries, along, history, "grammatical" if grammar else "perplexity")
    print("\n" + metrics.markdown_table(summaries, TABLE) + f"\n\n{note}")
    print(f"\nwrote {args.out_dir}/table.md, table.csv, sweep.json" + "".join(f", {os.path.basename(p)}" for p in plots)
          + f" in {time.time() - t_start:.0f}s")
    return summaries


if __name__ == "__main__":
    run_cli(main)
