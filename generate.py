"""
Sample with and without RE-Control, side by side, with the reward and the value of every response (E8).

    python generate.py --model toy --prompts toy-test --reward toy --value out/toyworld/value.pt
    python generate.py --model path/to/gpt2 --prompts prompts.txt --reward sentiment --value gpt2_value.pt \\
        --step-size 0.5 --n-steps 30 --out generations.jsonl
"""

import argparse
import json
import statistics
import time

import torch

import toyworld
from metrics import diversity
from model import eos_token_ids, generate
from recontrol import Controller
from tasks import check_prompts_fit, load_model, load_prompts, load_reward, run_cli
from value import load_value


def sample(model, enc, prompts, reward_fn, value, controller, args, seed):
    """One pass over `prompts` (each repeated samples_per_prompt times): rows with reward and V, and the timing."""
    jobs = [p for p in prompts for _ in range(args.samples_per_prompt)]
    eos = model.config.eos_token_ids or eos_token_ids(enc)
    rows, seconds, n_tokens = [], 0.0, 0
    for b in range(0, len(jobs), args.batch_size):
        batch = jobs[b:b + args.batch_size]
        t0 = time.perf_counter()
        out = generate(model, [enc.encode(p, allowed_special="all") for p in batch], args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_ids=eos,
                       stop_strings=args.stop, tokenizer=enc, seed=seed * 1_000_003 + b, edit=controller,
                       record_states=value is not None)
        seconds += time.perf_counter() - t0
        n_tokens += sum(len(t) for t in out.tokens)
        rewards = reward_fn(batch, out.texts)
        for i, (prompt, text) in enumerate(zip(batch, out.texts)):
            row = {"prompt": prompt, "response": text, "reward": float(rewards[i]), "tokens": out.tokens[i]}
            if value is not None:
                with torch.no_grad():
                    row["value_start"], row["value_end"] = value(out.states[i][[0, -1]]).tolist()
            if args.reward == "toy":  # the toy world: its grammar is checked exactly
                row["grammatical"] = toyworld.is_grammatical(text)
            rows.append(row)
    return rows, {"seconds": seconds, "tokens": n_tokens}


def summarize(runs, name):
    """Mean over seeds of each metric, with the spread (sd) of the mean reward across seeds."""
    per_seed = [statistics.fmean(r["reward"] for r in rows) for rows, _ in runs]
    all_rows = [r for rows, _ in runs for r in rows]
    summary = {"method": name, "reward": statistics.fmean(per_seed),
               "seed_sd": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
               "response_sd": statistics.pstdev(r["reward"] for r in all_rows),
               "diversity": diversity([r["tokens"] for r in all_rows]),
               "tokens_per_s": sum(t["tokens"] for _, t in runs) / sum(t["seconds"] for _, t in runs)}
    if "grammatical" in all_rows[0]:
        summary["grammatical"] = statistics.fmean(r["grammatical"] for r in all_rows)
    return summary


def print_table(summaries, first_column="method"):
    grammar = "grammatical" in summaries[0]
    print(f"{first_column:>14} {'reward':>8} {'± seeds':>8} {'sd/resp':>8}" + (f" {'grammatical':>11}" if grammar else "")
          + f" {'diversity':>9} {'tokens/s':>9}")
    for s in summaries:
        print(f"{s['method']:>14} {s['reward']:>+8.3f} {s['seed_sd']:>8.3f} {s['response_sd']:>8.3f}"
              + (f" {s['grammatical']:>11.1%}" if grammar else "") + f" {s['diversity']:>9.3f} {s['tokens_per_s']:>9.0f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy", help="'toy' (the embedded default) or a model folder / hub name")
    parser.add_argument("--prompts", default="toy-test", help="toy-test, or a .txt / .jsonl / HH-RLHF .jsonl.gz file")
    parser.add_argument("--reward", default="toy", help="toy, sentiment, rm:<folder>, or module:function")
    parser.add_argument("--value", default=None, help="value checkpoint from train_value.py (none: base model only)")
    parser.add_argument("--step-size", type=float, default=0.5, help="alpha of E7 (paper: 0.5 or 1.0)")
    parser.add_argument("--n-steps", type=int, default=30, help="gradient steps n of E7 per token (paper: 30)")
    parser.add_argument("--l2", type=float, default=0.0, help="lambda of E4/E7, the penalty on ||u||^2")
    parser.add_argument("--max-norm", type=float, default=None, help="project u onto ||u|| <= this (none: no limit)")
    parser.add_argument("--sweep", type=float, nargs="*", default=None,
                        help="instead of one setting, run each alpha*n given here (n from --n-steps)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="keep the nucleus of probability p")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest response")
    parser.add_argument("--stop", nargs="*", default=[], help="stop strings that end a response (e.g. 'Human:')")
    parser.add_argument("--samples-per-prompt", type=int, default=1, help="responses per prompt")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds; the table averages them")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts sampled together")
    parser.add_argument("--out", default=None, help="write every response as a JSON line here")
    parser.add_argument("--dtype", default=None, help="model dtype: float32, bfloat16 or float16 (default: as stored)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    args = parser.parse_args(argv)

    reward_fn = load_reward(args.reward, device=args.device)
    prompts = load_prompts(args.prompts)
    model, enc = load_model(args.model, dtype=args.dtype, device=args.device)
    check_prompts_fit(model, enc, prompts, args.max_new_tokens)
    value = load_value(args.value, model, args.model)[0].to(args.device) if args.value else None
    settings = [("base", None)]
    if value is not None and args.sweep is None:
        settings.append(("RE-Control", Controller(value, args.step_size, args.n_steps, args.l2, args.max_norm)))
    elif args.sweep is not None:
        if value is None:
            parser.error("--sweep needs --value")
        n = max(args.n_steps, 1)
        settings = [(f"{total:g}", Controller(value, total / n, n, args.l2, args.max_norm)) for total in args.sweep]
    summaries, rows_out = [], []
    for name, controller in settings:
        runs = [sample(model, enc, prompts, reward_fn, value, controller, args, seed) for seed in args.seeds]
        summaries.append(summarize(runs, name))
        rows_out += [dict(r, method=name, seed=seed) for seed, (rows, _) in zip(args.seeds, runs) for r in rows]
    print_table(summaries, "alpha*n" if args.sweep is not None else "method")
    if len(summaries) == 2 and args.sweep is None:
        base, ctrl = summaries
        gain = ctrl["reward"] - base["reward"]
        print(f"gain {gain:+.3f} = {gain / max(base['response_sd'], 1e-9):.2f} sd of the base model's per-response "
              f"reward; seed-to-seed spread {max(base['seed_sd'], ctrl['seed_sd']):.3f}")
    if args.out:
        with open(args.out, "w") as f:
            for row in rows_out:
                f.write(json.dumps({k: v for k, v in row.items() if k != "tokens"}) + "\n")
        print(f"wrote {len(rows_out)} responses to {args.out}")
    return summaries


if __name__ == "__main__":
    run_cli(main)
