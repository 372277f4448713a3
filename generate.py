"""
Sample with and without RE-Control, side by side, with the reward and the value of every response (E8).

    python generate.py --model toy --prompts toy-test --reward toy --value out/toyworld/value.pt
    python generate.py --model path/to/gpt2 --prompts prompts.txt --reward sentiment --value gpt2_value.pt \\
        --step-size 0.5 --n-steps 30 --out generations.jsonl
"""

import argparse
import json
import time
from dataclasses import dataclass

import torch

import metrics
import toyworld
from baselines import CountingReward
from model import generate
from control import Controller
from tasks import (add_sampling_arguments, add_task_arguments, check_prompts_fit, load_model, load_prompts,
                   load_reward, run_cli)
from value import load_value


@dataclass
class Method:
    """A way to sample: the base model, or it with one of the plug-ins of model.generate (see baselines.py)."""
    name: str
    edit: object = None  # o_t -> o_t + u_t (RE-Control, static editing)
    guide: object = None  # (prompts, counting reward) -> a rescore hook (reward-guided decoding)
    instruction: str = ""  # prepended to every prompt (prompting)
    best_of: int = 1  # N of best-of-N: the reward keeps the best of N samples


def sample_with(method, model, enc, prompts, reward_fn, args, seed, record_states=False):
    """One response per (prompt, sample) with `method`.

    Returns rows (prompt, response, tokens, reward, kl, states) and the method's cost: seconds of sampling,
    tokens generated (discarded best-of-N samples included) and its own reward calls (not the final scoring).
    """
    counting = CountingReward(reward_fn)
    jobs = [p for p in prompts for _ in range(args.samples_per_prompt)]
    rows, seconds, n_tokens = [], 0.0, 0
    for b in range(0, len(jobs), args.batch_size):
        batch = jobs[b:b + args.batch_size]
        expanded = [p for p in batch for _ in range(method.best_of)]
        ids = [enc.encode(method.instruction + p, allowed_special="all") for p in expanded]
        t0 = time.perf_counter()
        out = generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, stop_strings=args.stop, tokenizer=enc,
                       seed=seed * 1_000_003 + b, edit=method.edit,
                       rescore=method.guide(expanded, counting) if method.guide else None,
                       record_kl=True, record_states=record_states)
        chosen = list(range(len(batch)))
        if method.best_of > 1:
            scores = counting(expanded, out.texts).view(len(batch), method.best_of)
            chosen = (torch.arange(len(batch)) * method.best_of + scores.argmax(1)).tolist()
        seconds += time.perf_counter() - t0
        n_tokens += sum(len(t) for t in out.tokens)
        rows += [{"prompt": p, "response": out.texts[i], "tokens": out.tokens[i], "kl": out.kl[i],
                  "states": out.states[i] if record_states else None} for p, i in zip(batch, chosen)]
    rewards = reward_fn([r["prompt"] for r in rows], [r["response"] for r in rows])
    for row, reward in zip(rows, rewards.tolist()):
        row["reward"] = reward
    return rows, {"seconds": seconds, "tokens": n_tokens, "reward_calls": counting.calls}


def control_settings(args, stored):
    """(alpha, n, target, radius) of E7: the command line's where given, else those calibrated with V
    (train_value.py), else the paper's alpha = 0.5, n = 30 without a target or a radius."""
    step_size = args.step_size if args.step_size is not None else stored.get("step_size", 0.5)
    n_steps = args.n_steps if args.n_steps is not None else stored.get("n_steps", 30)
    radius = args.radius if args.radius is not None else stored.get("radius")
    if args.target == "auto":
        return step_size, n_steps, stored.get("target"), radius
    if args.target == "none":
        return step_size, n_steps, None, radius
    try:
        return step_size, n_steps, float(args.target), radius
    except ValueError:
        raise ValueError(f"--target must be a number, 'none' or 'auto', got {args.target!r}") from None


TABLE = ["method", "reward", "reward_sd_seeds", "reward_sd_responses", "grammatical", "perplexity", "diversity", "kl",
         "tokens_per_s"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_arguments(parser, prompts="toy-test")
    add_sampling_arguments(parser)
    parser.add_argument("--value", default=None, help="value checkpoint from train_value.py (none: base model only)")
    parser.add_argument("--step-size", type=float, default=None,
                        help="alpha of E7 (default: the one train_value.py calibrated and stored with V, else 0.5)")
    parser.add_argument("--n-steps", type=int, default=None,
                        help="gradient steps n of E7 per token (default: as calibrated with V, else 30)")
    parser.add_argument("--target", default="auto",
                        help="stop the ascent once V reaches this value: a number, 'none', or 'auto' (stored with V)")
    parser.add_argument("--l2", type=float, default=0.0, help="lambda of E4/E7, the penalty on ||u||^2")
    parser.add_argument("--radius", type=float, default=None,
                        help="keep ||u|| <= radius * ||o_t|| (default: as calibrated with V; inf: no limit)")
    parser.add_argument("--sweep", type=float, nargs="*", default=None,
                        help="instead of one setting, run each alpha*n given here (n, radius and target as set)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds; the table averages them")
    parser.add_argument("--out", default=None, help="write every response as a JSON line here")
    args = parser.parse_args(argv)
    if args.sweep is not None and not args.value:
        parser.error("--sweep needs --value")

    reward_fn = load_reward(args.reward, device=args.device)
    prompts = load_prompts(args.prompts)
    model, enc = load_model(args.model, dtype=args.dtype, device=args.device)
    args.max_new_tokens = check_prompts_fit(model, enc, prompts, args.max_new_tokens)
    methods = [Method("base")] if args.sweep is None else []
    value = None
    if args.value:
        value, checkpoint = load_value(args.value, model, args.model)
        value = value.to(model.wte.weight.device)
        step_size, n_steps, target, radius = control_settings(args, checkpoint.get("control") or {})
        print(f"RE-Control: alpha {step_size:g}, n {n_steps}, target V "
              f"{'none' if target is None else f'{target:+.3f}'}, radius {radius}")
        if args.sweep is not None:
            n = max(n_steps, 1)
            methods = [Method(f"alpha*n = {total:g}", Controller(value, total / n, n, args.l2, radius, target))
                       for total in args.sweep]
        else:
            methods.append(Method("RE-Control", Controller(value, step_size, n_steps, args.l2, radius, target)))
    toy = args.reward == "toy"  # the toy world: its grammar is checked exactly
    summaries, written = [], []
    for method in methods:
        runs = [sample_with(method, model, enc, prompts, reward_fn, args, seed, record_states=value is not None)
                for seed in args.seeds]
        summaries.append(metrics.summarize_runs(method.name, runs, model, enc,
                                                is_grammatical=toyworld.is_grammatical if toy else None))
        for seed, (rows, _) in zip(args.seeds, runs):
            for row in rows:
                record = {"method": method.name, "seed": seed, "prompt": row["prompt"], "response": row["response"],
                          "reward": row["reward"], "kl": row["kl"]}
                if value is not None:  # the value of the first and the last state of the response
                    with torch.no_grad():
                        record["value_start"], record["value_end"] = value(row["states"][[0, -1]]).tolist()
                if toy:
                    record["grammatical"] = toyworld.is_grammatical(row["response"])
                written.append(record)
    print(metrics.markdown_table(summaries, TABLE))
    if len(summaries) == 2 and args.sweep is None:
        base, ctrl = summaries
        gain = ctrl["reward"] - base["reward"]
        print(f"gain {gain:+.3f} = {gain / max(base['reward_sd_responses'], 1e-9):.2f} sd of the base model's "
              f"per-response reward; seed-to-seed spread {max(base['reward_sd_seeds'], ctrl['reward_sd_seeds']):.3f}")
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in written)
        print(f"wrote {len(written)} responses to {args.out}")
    return summaries


if __name__ == "__main__":
    run_cli(main)
