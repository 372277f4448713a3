"""
Methods side by side (E8): a `Method` is one way to sample (the base model, RE-Control, or a
baseline of evaluation/baselines.py), and `evaluate_methods` runs each over the same prompts and
seeds through the one sampling loop, then tabulates them (evaluation/report.py). `strength_sweep` is
the methods of a sweep of E7's strength alpha * n, the trade-off that recontrol.py prints and
compare.py plots.
"""

from dataclasses import dataclass, replace

from control import Controller
from evaluation import cost, report
from generate import sample_many
from plumbing import parallel


@dataclass
class Method:
    """A way to sample: the base model, or it with one of the plug-ins of generate.sample."""
    name: str
    edit: object = None  # o_t -> o_t + u_t (RE-Control, static editing)
    # (a batch's prompts) -> a rescore hook of the logits (reward-guided decoding)
    rescore_for: object = None
    instruction: str = ""  # prepended to every prompt (prompting)
    best_of: int = 1  # N of best-of-N: the reward keeps the best of N samples
    value: object = None  # a value function: V(o_t) is recorded along every response
    # (prompt tokens, decisions) -> FLOPs the method adds to sampling one response
    extra_flops: object = None


def sample_responses(method, model, enc, prompts, reward_fn, config, seed):
    """config.samples_per_prompt responses per prompt with `method` (generate.sample_many). Returns
    rows (prompt, response, tokens, reward, kl, finished; with the method's value, V(o_t) along the
    response) and the method's cost: seconds of sampling, tokens generated and forward-pass FLOPs
    (discarded best-of-N samples included, evaluation/cost.py), and its own reward calls (not the
    final scoring)."""
    n = method.best_of
    jobs = [p for p in prompts for _ in range(config.samples_per_prompt * n)]
    rows, spent = sample_many(model, enc, jobs, replace(config, batch_size=config.batch_size * n),
                              seed,
                              reward_fn, method.edit, method.value, method.rescore_for,
                              method.instruction)
    spent["flops"] = 0
    # what sampling every response cost, the discarded ones included
    for prompt, row in zip(jobs, rows):
        tokens = len(enc.encode(method.instruction + prompt, allowed_special="all"))
        decisions = cost.decisions_of(row, config.max_new_tokens)
        spent["flops"] += cost.sampling_flops(model.config, tokens, decisions) + (
            method.extra_flops(tokens, decisions) if method.extra_flops else 0)
    if n > 1:  # best-of-N: the reward's choice among each prompt's N samples (the first of equals)
        rows = [max(rows[i:i + n], key=lambda row: row["reward"]) for i in range(0, len(rows), n)]
        spent["reward_calls"] += len(jobs)
    return rows, spent


def evaluate_methods(methods, model, enc, prompts, reward_fn, config, seeds, is_grammatical=None):
    """Every method on every prompt for every seed. Returns one summary row per method and every
    response as a record (report.evaluate). Under torchrun the processes share the sampling; rank 0
    alone makes the summaries (the other ranks get ([], []))."""
    runs = {m.name: [sample_responses(m, model, enc, prompts, reward_fn, config,
                                      seed) for seed in seeds]
            for m in methods}
    if not parallel.is_main():
        return [], []
    return report.evaluate(runs, seeds, model, enc, is_grammatical)


def strength_sweep(value, control, totals):
    """RE-Control at each strength alpha * n in `totals` (n and the rest of `control` kept), as
    Methods named "alpha*n = ...": the one sweep of E7's strength."""
    return [Method(f"alpha*n = {total:g}",
                   Controller(value, control.with_total(total))) for total in totals]
