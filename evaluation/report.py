"""
The tables of results (E8): one summary row per method from its runs over seeds, every response as a
record, and the report that prints them. Sampling happens elsewhere (generate.sample_many); this
file only reads rows.
"""

import math
import statistics

from evaluation import metrics

TABLE = ["method", "reward", "reward_sd_seeds", "reward_sd_responses", "grammatical", "perplexity",
         "coherence", "diversity", "kl", "cut", "tokens_per_s"]


def evaluate(runs, seeds, model, enc, is_grammatical=None):
    """runs: {method name: [(rows, cost) for each of the sampling `seeds`]}, as generate.sample_many
    returns them. Returns one summary row per method (summarize_runs) and every response as a
    record: method, seed, prompt, response, tokens, finished, reward, KL; with values recorded,
    those of the response's first and last states; with `is_grammatical`, the toy grammar's verdict.
    """
    summaries, records = [], []
    for name, method_runs in runs.items():
        summaries.append(summarize_runs(name, method_runs, model, enc, is_grammatical))
        for seed, (rows, _) in zip(seeds, method_runs):
            for row in rows:
                record = {"method": name, "seed": seed, **{k: row[k] for k in (
                    "prompt", "response", "tokens", "finished", "reward", "kl")}}
                if "values" in row:  # the value of the first and the last state of the response
                    record["value_start"], record["value_end"] = row["values"][0], row["values"][-1]
                if is_grammatical is not None:
                    record["grammatical"] = is_grammatical(row["response"])
                records.append(record)
    return summaries, records


def summarize_runs(name, runs, model=None, enc=None, is_grammatical=None):
    """One row of a results table from runs of one method, one per seed, each (rows, cost) as
    returned by generate.sample_many. The reward's spread is over seeds; coherence and perplexity
    need the base model."""
    reward, spread = metrics.mean_and_spread([statistics.fmean(r["reward"] for r in rows) for rows,
                                              _ in runs])
    rows = [r for run, _ in runs for r in run]
    ms_per_response, tokens_per_s = metrics.throughput(sum(c["tokens"] for _, c in runs), len(rows),
                                               sum(c["seconds"] for _, c in runs))
    summary = {"method": name, "reward": reward, "reward_sd_seeds": spread,
               "reward_sd_responses": statistics.pstdev(r["reward"] for r in rows),
               "diversity": metrics.diversity([r["tokens"] for r in rows]),
               "grammatical": metrics.grammatical_fraction([r["response"] for r in rows],
                                                           is_grammatical)
               if is_grammatical else float("nan"),
               "kl": statistics.fmean(r["kl"] for r in rows), "ms_per_response": ms_per_response,
               "cut": statistics.fmean(not r.get("finished", True) for r in rows),
               "tokens_per_s": tokens_per_s,
               "reward_calls_per_response": sum(c["reward_calls"] for _, c in runs) / len(rows),
               "flops_per_response": sum(c.get("flops", float("nan")) for _, c in runs) / len(rows)}
    if model is not None:
        prompts_ids = [enc.encode(r["prompt"], allowed_special="all") for r in rows]
        summary["coherence"] = metrics.coherence(model, prompts_ids, [r["tokens"] for r in rows])
        summary["perplexity"] = metrics.perplexity(model, prompts_ids, [r["tokens"] for r in rows])
    return summary


COLUMNS = {"method": ("method", "{}"), "reward": ("reward", "{:+.3f}"),
           "reward_sd_seeds": ("± seeds", "{:.3f}"),
           "reward_sd_responses": ("sd/response", "{:.3f}"), "diversity": ("diversity", "{:.3f}"),
           "coherence": ("coherence", "{:.3f}"), "perplexity": ("perplexity", "{:.2f}"),
           "grammatical": ("grammatical", "{:.1%}"), "kl": ("KL/token", "{:.3f}"),
           "ms_per_response": ("ms/response", "{:.1f}"), "tokens_per_s": ("tokens/s", "{:.0f}"),
           "reward_calls_per_response": ("reward calls/response", "{:.1f}"),
           "cut": ("cut at the limit", "{:.1%}"),
           "flops_per_response": ("FLOPs/response", "{:.3g}"),
           "win_rate": ("win rate vs base (judge)", "{:.1%}"),
           "win_rate_sd_seeds": ("± seeds", "{:.1%}"), "judge": ("judge", "{:+.3f}")}


def add_win_rates(summaries, runs, judge):
    """Each summary gets the judge's mean score and its win rate against the base model ("base" in
    runs): its response j at seed s against the base model's response j at seed s, ties counting
    half; the mean over seeds and its spread. runs: {method name: [(rows, cost) for each seed]}, the
    rows in the same job order."""
    def scores(rows):
        return judge([r["prompt"] for r in rows], [r["response"] for r in rows])

    base = [scores(rows) for rows, _ in runs["base"]]
    for summary in summaries:
        ours = [scores(rows) for rows, _ in runs[summary["method"]]]
        wins = [((a > b).float() + 0.5 * (a == b).float()).mean().item() for a,
                b in zip(ours, base)]
        summary["win_rate"], summary["win_rate_sd_seeds"] = metrics.mean_and_spread(wins)
        summary["judge"] = statistics.fmean(x for s in ours for x in s.tolist())


def markdown_table(summaries, keys=TABLE):
    """The summaries as a Markdown table of the columns `keys` (those that no row has, or that are
    NaN in every row, are left out)."""
    def missing(s, k):
        return isinstance(s.get(k, math.nan), float) and math.isnan(s.get(k, math.nan))
    keys = [k for k in keys if any(not missing(s, k) for s in summaries)]
    lines = ["| " + " | ".join(COLUMNS[k][0] for k in keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(COLUMNS[k][1].format(s[k]) for k in keys) + " |" for s in summaries]
    return "\n".join(lines)


def print_report(summaries, records=(), examples=0):
    """The table; with a base model and one other method, the gain in units of the base model's
    spread; the first `examples` prompts' responses of the first seed, method beside method."""
    print(markdown_table(summaries))
    if len(summaries) == 2 and summaries[0]["method"] == "base":
        base, other = summaries
        gain = other["reward"] - base["reward"]
        print(f"gain {gain:+.3f} = {gain / max(base['reward_sd_responses'], 1e-9):.2f} sd of the "
              "base model's per-response reward; seed-to-seed spread "
              f"{max(base['reward_sd_seeds'], other['reward_sd_seeds']):.3f}")
    first_seed = records[0]["seed"] if records else None
    shown = list(dict.fromkeys(r["prompt"] for r in records))[:examples]
    for prompt in shown:
        print(f"\n{prompt}")
        for r in records:
            if r["prompt"] == prompt and r["seed"] == first_seed:
                print(f"  {r['method']:>12} {r['reward']:+.2f}  {r['response']!r}")
