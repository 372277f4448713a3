"""
The paper's comparison in miniature (Table 1 of Kong et al.): the base model, prompting, static representation
editing, best-of-N, reward-guided decoding (prefix reward, and learned V on the next state) and RE-Control, all
through the same sampling loop, on the same held-out prompts, with the same reward, over several seeds.
Writes the table as Markdown and CSV, and the plots as PNG (with matplotlib installed).

    python compare.py        # the embedded toy world; trains V first when out/toyworld/value.pt is missing
    python compare.py --model path/to/gpt2 --prompts test.txt --reward sentiment --value gpt2_value.pt
"""

import argparse
import csv
import json
import os
import time
from dataclasses import dataclass

import torch

import metrics
import toyworld
from baselines import CountingReward, NextStateValueGuide, PrefixRewardGuide, SteeringEdit, steering_vector
from model import eos_token_ids, generate
from recontrol import TOY_N_STEPS, TOY_STEP_SIZE, TOY_TRAIN_ARGS, Controller, Rollouts
from tasks import check_prompts_fit, load_model, load_prompts, load_reward, run_cli
from train_value import history_path
from value import load_value


@dataclass
class Method:
    name: str
    edit: object = None  # o_t -> o_t + u_t (static editing, RE-Control)
    guide: object = None  # (prompts, counting reward) -> a rescore hook for model.generate (reward-guided decoding)
    instruction: str = ""  # prepended to every prompt (prompting)
    best_of: int = 1  # N of best-of-N


def sample_with(method, model, enc, prompts, reward_fn, args, seed, record_states=False):
    """One response per (prompt, sample) with `method`: rows, and the cost (seconds, tokens, reward calls)."""
    counting = CountingReward(reward_fn)
    jobs = [p for p in prompts for _ in range(args.samples_per_prompt)]
    eos = model.config.eos_token_ids or eos_token_ids(enc)
    rows, seconds, n_tokens = [], 0.0, 0
    for b in range(0, len(jobs), args.batch_size):
        batch = jobs[b:b + args.batch_size]
        expanded = [p for p in batch for _ in range(method.best_of)]
        ids = [enc.encode(method.instruction + p, allowed_special="all") for p in expanded]
        t0 = time.perf_counter()
        out = generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, eos_ids=eos, stop_strings=args.stop, tokenizer=enc,
                       seed=seed * 1_000_003 + b, edit=method.edit,
                       rescore=method.guide(expanded, counting) if method.guide else None,
                       record_kl=True, record_states=record_states)
        chosen = list(range(len(batch)))
        if method.best_of > 1:  # keep the best of each prompt's N samples
            scores = counting(expanded, out.texts).view(len(batch), method.best_of)
            chosen = (torch.arange(len(batch)) * method.best_of + scores.argmax(1)).tolist()
        seconds += time.perf_counter() - t0
        n_tokens += sum(len(t) for t in out.tokens)  # every token generated, discarded samples included
        for prompt, i in zip(batch, chosen):
            rows.append({"prompt": prompt, "text": out.texts[i], "tokens": out.tokens[i], "kl": out.kl[i],
                         "states": out.states[i] if record_states else None})
    rewards = reward_fn([r["prompt"] for r in rows], [r["text"] for r in rows])  # evaluation: not counted
    for r, reward in zip(rows, rewards.tolist()):
        r["reward"] = reward
    return rows, {"seconds": seconds, "tokens": n_tokens, "reward_calls": counting.calls}


def summarize(name, runs, model, enc, toy):
    """One row of the table: the metrics of E8 over all seeds' responses, the reward's spread over seeds."""
    reward, spread = metrics.mean_and_spread([sum(r["reward"] for r in rows) / len(rows) for rows, _ in runs])
    rows = [r for run, _ in runs for r in run]
    prompts_ids = [enc.encode(r["prompt"], allowed_special="all") for r in rows]
    seconds = sum(c["seconds"] for _, c in runs)
    ms_per_response, tokens_per_s = metrics.throughput(sum(c["tokens"] for _, c in runs), len(rows), seconds)
    return {"method": name, "reward": reward, "reward_sd_seeds": spread,
            "diversity": metrics.diversity([r["tokens"] for r in rows]),
            "coherence": metrics.coherence(model, prompts_ids, [r["tokens"] for r in rows]),
            "perplexity": metrics.perplexity(model, prompts_ids, [r["tokens"] for r in rows]),
            "grammatical": metrics.grammatical_fraction([r["text"] for r in rows], toyworld.is_grammatical)
            if toy else float("nan"),
            "kl": sum(r["kl"] for r in rows) / len(rows), "ms_per_response": ms_per_response,
            "tokens_per_s": tokens_per_s, "reward_calls_per_response": sum(c["reward_calls"] for _, c in runs) / len(rows)}


COLUMNS = [("method", "method", "{}"), ("reward", "reward", "{:+.3f}"), ("reward_sd_seeds", "± seeds", "{:.3f}"),
           ("diversity", "diversity", "{:.3f}"), ("coherence", "coherence", "{:.3f}"),
           ("perplexity", "perplexity", "{:.2f}"), ("grammatical", "grammatical", "{:.1%}"), ("kl", "KL/token", "{:.3f}"),
           ("ms_per_response", "ms/response", "{:.1f}"), ("tokens_per_s", "tokens/s", "{:.0f}"),
           ("reward_calls_per_response", "reward calls/response", "{:.1f}")]


def markdown_table(summaries):
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for s in summaries:
        lines.append("| " + " | ".join(f.format(s[k]) for k, _, f in COLUMNS) + " |")
    return "\n".join(lines)


def write_outputs(summaries, out_dir, note):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(markdown_table(summaries) + f"\n\n{note}\n")
    with open(os.path.join(out_dir, "table.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k, _, _ in COLUMNS])
        writer.writeheader()
        writer.writerows({k: s[k] for k, _, _ in COLUMNS} for s in summaries)


def value_along_tokens(value, rows, length):
    """Mean V(o_t) at each step t over the responses that reach it."""
    means = []
    with torch.no_grad():
        for t in range(length):
            vs = [value(r["states"][t]).item() for r in rows if r["states"].shape[0] > t]
            if not vs:
                break
            means.append(sum(vs) / len(vs))
    return means


def plot_all(out_dir, sweep, summaries, along, history, fluency_key):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    label = "grammatical fraction" if fluency_key == "grammatical" else "perplexity under the base model"
    fig, ax = plt.subplots(figsize=(7, 5))
    for n in sorted({s["n"] for s in sweep}):
        pts = sorted((s for s in sweep if s["n"] == n), key=lambda s: s["alpha"])
        ax.plot([s[fluency_key] for s in pts], [s["reward"] for s in pts], "o-", label=f"RE-Control, n = {n} (alpha grows)")
    for s in summaries:
        ax.scatter(s[fluency_key], s["reward"], marker="s", s=60, zorder=3)
        ax.annotate(s["method"], (s[fluency_key], s["reward"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(label)
    ax.set_ylabel("mean reward")
    ax.set_title("Reward against fluency: alpha x n sweep, baselines as squares")
    ax.legend(fontsize=8)
    paths = [os.path.join(out_dir, "reward_vs_fluency.png")]
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in along.items():
        ax.plot(range(len(curve)), curve, "o-", ms=3, label=name)
    ax.set_xlabel("step t of the response")
    ax.set_ylabel("mean V(o_t)")
    ax.set_title("V(o_t) along generated responses (mean over those that reach step t)")
    ax.legend()
    paths.append(os.path.join(out_dir, "value_along_tokens.png"))
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    if history:
        fig, ax = plt.subplots(figsize=(7, 4))
        epochs = [h["epoch"] for h in history]
        ax.plot(epochs, [h["train_loss"] for h in history], label="training loss")
        ax.plot(epochs, [h["held_out_loss"] for h in history], label="held-out loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("Bellman loss (E6)")
        ax.set_title("Value training")
        ax.legend()
        paths.append(os.path.join(out_dir, "value_training.png"))
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy", help="'toy' (the embedded default) or a model folder / hub name")
    parser.add_argument("--prompts", default="toy-test", help="held-out prompts: toy-test or a prompt file")
    parser.add_argument("--reward", default="toy", help="toy, sentiment, rm:<folder>, or module:function")
    parser.add_argument("--value", default=None, help="value checkpoint (toy default: out/toyworld/value.pt, trained if missing)")
    parser.add_argument("--rollouts", default=None, help="rollouts V was trained on, for the steering vector (default: from the checkpoint)")
    parser.add_argument("--out-dir", default="out/compare", help="where table.md, table.csv and the plots go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="responses per prompt and seed")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest response")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--top-k", type=int, default=None, help="top-k truncation of every method's sampling")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus truncation of every method's sampling")
    parser.add_argument("--stop", nargs="*", default=[], help="stop strings that end a response")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts sampled together")
    parser.add_argument("--step-size", type=float, default=TOY_STEP_SIZE, help="RE-Control: alpha of E7")
    parser.add_argument("--n-steps", type=int, default=TOY_N_STEPS, help="RE-Control: gradient steps n of E7")
    parser.add_argument("--instruction", default=None, help="prompting: text prepended to each prompt")
    parser.add_argument("--steering-scale", type=float, default=8.0,
                        help="static editing: scale of the vector (8: chosen on the toy world, see README)")
    parser.add_argument("--best-of", type=int, default=4, help="best-of-N: N")
    parser.add_argument("--guide-k", type=int, default=10, help="reward-guided decoding: candidates re-scored per step")
    parser.add_argument("--guide-weight", type=float, default=2.0, help="reward-guided decoding (prefix reward): w")
    parser.add_argument("--value-guide-weight", type=float, default=4.0, help="reward-guided decoding (V of the next state): w")
    parser.add_argument("--sweep-alphas", type=float, nargs="*", default=[0.25, 0.5, 1.0, 2.0], help="alphas of the sweep plot")
    parser.add_argument("--sweep-steps", type=int, nargs="*", default=[5, 10, 20], help="n of the sweep plot")
    args = parser.parse_args(argv)
    toy = args.reward == "toy"

    t_start = time.time()
    reward_fn = load_reward(args.reward)
    prompts = load_prompts(args.prompts)
    model, enc = load_model(args.model)
    check_prompts_fit(model, enc, prompts, args.max_new_tokens)
    if args.value is None:
        if args.model != "toy":
            parser.error("--value is needed for a model other than the toy world's")
        args.value = "out/toyworld/value.pt"
        if not os.path.exists(args.value):
            import train_value
            train_value.main(["--model", "toy", "--prompts", "toy-train", "--reward", "toy", "--out", args.value,
                              "--rollouts", "out/toyworld/rollouts"] + TOY_TRAIN_ARGS)
    value, checkpoint = load_value(args.value, model, args.model)
    trained = checkpoint["train_args"]
    rollouts = Rollouts(args.rollouts or trained.get("rollouts") or os.path.splitext(trained["out"])[0] + "_rollouts")
    n_train_prompts = rollouts.settings["n_prompts"]
    instruction = args.instruction if args.instruction is not None else (
        "i love it . i would recommend it . " if toy else "A positive, kind and helpful reply follows.\n")

    vector = steering_vector(rollouts, range(n_train_prompts))
    methods = [Method("base"), Method("prompting", instruction=instruction),
               Method("static editing", edit=SteeringEdit(vector, args.steering_scale)),
               Method(f"best-of-{args.best_of}", best_of=args.best_of),
               Method("ARGS (prefix R)", guide=lambda p, r: PrefixRewardGuide(r, enc, p, args.guide_k, args.guide_weight)),
               Method("CD (V next state)", guide=lambda p, r: NextStateValueGuide(model, value, args.guide_k,
                                                                                   args.value_guide_weight)),
               Method("RE-Control", edit=Controller(value, args.step_size, args.n_steps))]
    summaries, along = [], {}
    for method in methods:
        record = method.name in ("base", "RE-Control")
        runs = [sample_with(method, model, enc, prompts, reward_fn, args, seed, record_states=record)
                for seed in args.seeds]
        summaries.append(summarize(method.name, runs, model, enc, toy))
        if record:
            along[method.name] = value_along_tokens(value, runs[0][0], args.max_new_tokens + 1)
        print(f"{method.name:>18}: reward {summaries[-1]['reward']:+.3f} ({time.time() - t_start:.0f}s)", flush=True)

    sweep = []
    for n in args.sweep_steps:
        for alpha in args.sweep_alphas:
            runs = [sample_with(Method("sweep", edit=Controller(value, alpha, n)), model, enc, prompts, reward_fn, args,
                                args.seeds[0])]
            sweep.append(dict(summarize("sweep", runs, model, enc, toy), alpha=alpha, n=n))
    print(f"sweep of {len(sweep)} settings done ({time.time() - t_start:.0f}s)")

    note = (f"{len(prompts)} held-out prompts x {args.samples_per_prompt} samples x {len(args.seeds)} seeds; "
            f"{metrics.COHERENCE_NOTE}; KL/token is measured against the base model reading the same context, so it "
            "is 0 by construction for prompting and best-of-N; reward calls count only the method's own calls.")
    write_outputs(summaries, args.out_dir, note)
    with open(os.path.join(args.out_dir, "sweep.json"), "w") as f:
        json.dump(sweep, f, indent=1)
    history = None
    if os.path.exists(history_path(args.value)):
        with open(history_path(args.value)) as f:
            history = json.load(f)
    plots = plot_all(args.out_dir, sweep, summaries, along, history, "grammatical" if toy else "perplexity")
    print("\n" + markdown_table(summaries) + f"\n\n{note}")
    print(f"\nwrote {args.out_dir}/table.md, table.csv, sweep.json" + "".join(f", {os.path.basename(p)}" for p in plots)
          + f" in {time.time() - t_start:.0f}s")
    return summaries


if __name__ == "__main__":
    run_cli(main)
