"""
The grader's own test: the mistakes students make, planted one at a time in a copy of the
reference, each of which its exercise's tests (public and hidden) must catch; and other correct ways
to write an exercise, each of which they must pass. Run by a slow test, so the exercise tests cannot
weaken unnoticed; the table it prints says which tests catch which mistake, and with what message.

    python -m course.mutations            # every plant, two at a time (a few minutes)
    python -m course.mutations --only E6  # one exercise's

A teacher's file (course/exercises.py, TEACHER_ONLY): it holds reference lines.
"""

import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from course.exercises import EXERCISES, copy_project
from course.grading import run_tests
from plumbing.cli import new_parser, run_cli


@dataclass(frozen=True)
class Plant:
    exercise: str
    what: str  # the mistake (or the other correct way), as a student would have written it
    file: str
    reference: str  # lines of the reference's exercise block, exactly as they stand there
    planted: str  # what replaces them
    also: tuple = ()  # further (reference, planted) pairs in the same file


KV = "model.py"
LOOP = "generate.py"
TD = "value.py"
ASCENT = "control.py"
METRIC = "evaluation/metrics.py"
WRITE_K = "        self.k[layer, :, :, self.length:end] = k\n"
WRITE_V = "        self.v[layer, :, :, self.length:end] = v\n"
READ_KV = "        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]"
HEAD = "        return self.lm_head(o) if not self.config.n_labels else self.score(o)"
BASE = "    base_logits = model.head(o) if edit is None or want_base else None\n"
EDITED = "    logits = model.head(edit(o)) if edit is not None else base_logits"
NEXT = "    return model.states(y[:, None], cache)[:, -1]"
SG = "    bootstrap = values.detach() if stop_gradient else values"
STEP_BACK = "            G = gamma * ((1 - lam) * bootstrap[:, t + 1] + lam * G)"
TERMINAL = "        G = torch.where(t == last, rewards, G)\n"
TARGETS = "    targets = lambda_returns(values, mask, rewards, lam, gamma, stop_gradient)"
MEAN = "    return (((values - targets) ** 2) * mask).sum() / mask.sum()"
GRAD = "            grad = dv - 2 * c.l2 * u"
ASCEND = "            u = u + c.step_size * grad"
GRAMS = "            grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]"
RATIO = "                score *= len(set(grams)) / len(grams)"
ORDERS = "        for n in (2, 3, 4):"
AVERAGE = '    return statistics.fmean(scores) if scores else float("nan")'

MISTAKES = [
    Plant("E1", "the cache written from slot 0 at every step", KV, WRITE_K + WRITE_V,
          WRITE_K.replace("self.length:end", ":k.shape[2]")
          + WRITE_V.replace("self.length:end", ":v.shape[2]")),
    Plant("E1", "only this step's keys and values returned (no memory)", KV, READ_KV,
          "        return k, v"),
    Plant("E1", "the whole buffer returned, empty slots included", KV, READ_KV,
          "        return self.k[layer], self.v[layer]"),
    Plant("E1", "the values never written", KV, WRITE_V, ""),
    Plant("E1", "write moves `length` itself (the model already does, after all layers)", KV,
          WRITE_V, WRITE_V + "        self.length = end\n"),
    Plant("E1", "the keys written where the values belong", KV, WRITE_V,
          WRITE_V.replace("= v", "= k")),
    Plant("E2", "softmax instead of logits", KV, HEAD,
          "        return (self.lm_head(o) if not self.config.n_labels else "
          "self.score(o)).softmax(-1)"),
    Plant("E2", "the reward model's head ignored (n_labels)", KV, HEAD,
          "        return self.lm_head(o)"),
    Plant("E2", "the final norm applied a second time", KV, HEAD,
          "        o = self.norm_f(o)\n" + HEAD),
    Plant("E2", "the embedding matrix itself, not the head (wrong for an untied model)", KV, HEAD,
          "        return o @ self.wte.weight.T if not self.config.n_labels else self.score(o)"),
    Plant("E3", "the next token read without the KV cache", LOOP, NEXT,
          "    return model.states(y[:, None])[:, -1]"),
    Plant("E3", "o overwritten with the edit, so the recorded KL is always 0", LOOP, BASE + EDITED,
          "    o = edit(o) if edit is not None else o\n    logits = base_logits = model.head(o)"),
    Plant("E3", "no base logits recorded when the KL asks for them", LOOP, BASE,
          "    base_logits = model.head(o) if edit is None else None\n"),
    Plant("E3", "the edit ignored", LOOP, EDITED, "    logits = model.head(o)"),
    Plant("E3", "the edit applied twice", LOOP, EDITED,
          "    logits = model.head(edit(edit(o))) if edit is not None else base_logits"),
    Plant("E3", "softmax probabilities used as logits", LOOP, EDITED,
          "    logits = model.head(edit(o)).softmax(-1) if edit is not None else base_logits"),
    Plant("E6", "the stop_gradient setting ignored: never detached", TD, SG,
          "    bootstrap = values"),
    Plant("E6", "the stop_gradient setting ignored: always detached", TD, SG,
          "    bootstrap = values.detach()"),
    Plant("E6", "lambda and 1 - lambda swapped", TD, STEP_BACK,
          "            G = gamma * (lam * bootstrap[:, t + 1] + (1 - lam) * G)"),
    Plant("E6", "gamma on the bootstrap only, the returns undiscounted", TD, STEP_BACK,
          "            G = (1 - lam) * gamma * bootstrap[:, t + 1] + lam * G"),
    Plant("E6", "gamma never applied", TD, STEP_BACK,
          "            G = (1 - lam) * bootstrap[:, t + 1] + lam * G"),
    Plant("E6", "off by one: bootstrapping from V(o_t), not V(o_{t+1})", TD, STEP_BACK,
          "            G = gamma * ((1 - lam) * bootstrap[:, t] + lam * G)"),
    Plant("E6", "the terminal target V(o_T), not R", TD, TERMINAL,
          "        G = torch.where(t == last, bootstrap[:, t], G)\n"),
    Plant("E6", "padding counted: R placed at the padded end, not at each response's end", TD,
          TERMINAL, ""),
    Plant("E6", "the last real state found with mask.argmax (the first one)", TD,
          "    last = last_index(mask)", "    last = mask.long().argmax(1)"),
    Plant("E6", "the caller's values zeroed in place at the padding", TD, SG,
          "    values.masked_fill_(~mask, 0.0)\n" + SG),
    Plant("E6", "the loss averaged over every position, padding counted", TD, MEAN,
          "    return ((values - targets) ** 2).mean()"),
    Plant("E6", "the loss summed per response, averaged over responses", TD, MEAN,
          "    return (((values - targets) ** 2) * mask).sum() / len(mask)"),
    Plant("E6", "the loss with lambda = 1 whatever lambda is asked", TD, TARGETS,
          TARGETS.replace(", lam,", ", 1.0,")),
    Plant("E6", "the loss's targets not held fixed", TD, TARGETS,
          TARGETS.replace("stop_gradient)", "False)")),
    Plant("E7", "descending: u <- u - alpha grad", ASCENT, ASCEND,
          "            u = u - c.step_size * grad"),
    Plant("E7", "the step size left out", ASCENT, ASCEND, "            u = u + grad"),
    Plant("E7", "the l2 penalty's gradient without its factor 2", ASCENT, GRAD,
          "            grad = dv - c.l2 * u"),
    Plant("E7", "the l2 penalty with the wrong sign", ASCENT, GRAD,
          "            grad = dv + 2 * c.l2 * u"),
    Plant("E7", "the l2 penalty left out", ASCENT, GRAD, "            grad = dv"),
    Plant("E7", "the gradient of the step before added again (never zeroed)", ASCENT, GRAD,
          "            grad = dv - 2 * c.l2 * u + (grad if _ else 0)"),
    Plant("E7", "the caller's states edited in place", ASCENT, ASCEND,
          ASCEND + "\n            o += c.step_size * grad"),
    Plant("E8", "n-grams pooled over all responses", METRIC,
          "    scores = []\n    for tokens in responses:\n",
          "    scores = []\n    for tokens in [sum(responses, [])]:\n"),
    Plant("E8", "responses too short for an n-gram left out of the mean", METRIC, AVERAGE,
          "    scores = [s for s, r in zip(scores, responses) if len(r) >= 2]\n" + AVERAGE),
    Plant("E8", "a short response scored 0", METRIC, RATIO,
          RATIO + "\n            else:\n                score = 0.0"),
    Plant("E8", "n from 1 to 3", METRIC, ORDERS, "        for n in (1, 2, 3):"),
    Plant("E8", "off by one: the last n-gram of each response left out", METRIC, GRAMS,
          GRAMS.replace("- n + 1", "- n")),
    Plant("E8", "the mean of the three ratios, not their product", METRIC, RATIO,
          "                score -= (1 - len(set(grams)) / len(grams)) / 3"),
]

ALTERNATIVES = [
    Plant("E1", "copy_ into a narrowed view", KV, WRITE_K + WRITE_V,
          "        self.k[layer].narrow(2, self.length, k.shape[2]).copy_(k)\n"
          "        self.v[layer].narrow(2, self.length, v.shape[2]).copy_(v)\n"),
    Plant("E2", "the two heads the other way round", KV, HEAD,
          "        if self.config.n_labels:\n            return self.score(o)\n"
          "        return self.lm_head(o)"),
    Plant("E3", "each case written out", LOOP, BASE + EDITED,
          "    if edit is None:\n        logits = base_logits = model.head(o)\n    else:\n"
          "        logits = model.head(edit(o))\n"
          "        base_logits = model.head(o) if want_base else None"),
    Plant("E3", "unsqueeze and squeeze", LOOP, NEXT,
          "    return model.states(y.unsqueeze(1), cache).squeeze(1)"),
    Plant("E6", "the stop-gradient on the finished targets", TD, SG, "    bootstrap = values",
          also=(("    return torch.stack(targets, dim=1)  # (B, L)",
                 "    targets = torch.stack(targets, dim=1)  # (B, L)\n"
                 "    return targets.detach() if stop_gradient else targets"),)),
    Plant("E6", "one response at a time, the padding's targets left at 0", TD,
          "    rewards = rewards.float()\n", "    rewards = rewards.float()\n"
          "    done = torch.zeros(B, L, device=values.device)\n    for b in range(B):\n"
          "        G = rewards[b]\n        done[b, last[b]] = G\n"
          "        for t in range(int(last[b]) - 1, -1, -1):\n"
          "            G = gamma * ((1 - lam) * bootstrap[b, t + 1] + lam * G)\n"
          "            done[b, t] = G\n    return done\n"),
    Plant("E6", "the loss with F.mse_loss on the real states", TD, MEAN,
          "    return torch.nn.functional.mse_loss(values[mask.bool()], targets[mask.bool()])"),
    Plant("E7", "autograd, a fresh gradient at every step", ASCENT, GRAD,
          "            with torch.enable_grad():\n"
          "                x = (o + u).requires_grad_(True)\n"
          "                (dv,) = torch.autograd.grad(self.value(x).sum(), x)\n" + GRAD),
    Plant("E7", "backward() into a fresh leaf at every step", ASCENT, GRAD,
          "            with torch.enable_grad():\n"
          "                x = (o + u).detach().requires_grad_(True)\n"
          "                self.value(x).sum().backward()\n"
          "            grad = x.grad - 2 * c.l2 * u"),
    Plant("E7", "u += alpha grad", ASCENT, ASCEND, "            u += c.step_size * grad"),
    Plant("E8", "n-grams with zip", METRIC, GRAMS,
          "            grams = list(zip(*(tokens[i:] for i in range(n))))"),
    Plant("E8", "a plain mean", METRIC, AVERAGE,
          '    return sum(scores) / len(scores) if scores else float("nan")'),
]


def plant(folder, planted):
    """Write `planted` into the copy in `folder`; returns the file's reference text, to put back.
    Each reference part must stand exactly once, inside its exercise's block."""
    path = os.path.join(folder, planted.file)
    with open(path) as f:
        reference = f.read()
    begin, end = f"# >>> exercise {planted.exercise}:", f"# <<< exercise {planted.exercise}"
    blocks = [part.split(end)[0] for part in reference.split(begin)[1:]]
    text = reference
    for old, new in ((planted.reference, planted.planted),) + planted.also:
        if reference.count(old) != 1 or not any(old in block for block in blocks):
            raise ValueError(f"{planted.exercise}, '{planted.what}': its reference lines are not "
                             f"inside the exercise's block of {planted.file} exactly once; has "
                             "the reference changed? Write the plant again from it")
        text = text.replace(old, new)
    with open(path, "w") as f:
        f.write(text)
    return reference


def verdicts(plants, workers=2, time_limit=120):
    """[(plant, Outcome)]: each plant in a copy of the reference, and its exercise's tests run,
    `workers` copies at a time."""
    with tempfile.TemporaryDirectory(prefix="mutations-") as root:
        free = []
        for i in range(workers):
            copy_project(os.path.join(root, str(i)))
            free.append(os.path.join(root, str(i)))
        lock = threading.Lock()

        def judge(planted):
            with lock:
                folder = free.pop()
            reference = plant(folder, planted)
            try:
                return planted, run_tests(folder, [planted.exercise], time_limit)
            finally:
                with open(os.path.join(folder, planted.file), "w") as f:
                    f.write(reference)
                with lock:
                    free.append(folder)

        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(judge, plants))


def report(mistakes, alternatives, workers=2):
    """(Markdown table, [problems]) of the verdicts on every mistake and alternative."""
    lines = ["| exercise | planted | verdict | the tests that fail | the first one's message |",
             "|---|---|---|---|---|"]
    problems = []
    for planted, outcome in verdicts(mistakes + alternatives, workers):
        is_mistake = planted in mistakes
        failures = outcome.failures()
        caught = bool(outcome.problem or failures)
        message = next(iter(failures.values())) if failures else outcome.problem or ""
        if caught != is_mistake:
            problems.append(f"{planted.exercise} '{planted.what}': "
                            + (f"fails: {message}" if caught else "passes every test"))
        kind = "mistake" if is_mistake else "alternative"
        verdict = {(True, True): "caught", (True, False): "NOT CAUGHT",
                   (False, True): "WRONGLY FAILS", (False, False): "passes"}[is_mistake, caught]
        lines.append(f"| {planted.exercise} | {kind}: {planted.what} | {verdict} | "
                     f"{', '.join(failures)} | {message.replace('|', '/')} |")
    return "\n".join(lines) + "\n", problems


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--only", nargs="+", default=list(EXERCISES),
                        help="the exercises whose plants to run")
    parser.add_argument("--workers", type=int, default=2,
                        help="copies of the project tested at once (one per CPU core)")
    args = parser.parse_args(argv)
    unknown = [e for e in args.only if e not in EXERCISES]
    if unknown:
        raise ValueError(f"unknown exercise {unknown[0]}; --only takes {', '.join(EXERCISES)}")
    if args.workers < 1:
        raise ValueError(f"--workers must be a number >= 1, got {args.workers}")
    chosen = [[p for p in plants if p.exercise in args.only] for plants in (MISTAKES, ALTERNATIVES)]
    table, problems = report(*chosen, args.workers)
    print(table)
    if problems:
        raise SystemExit("the exercise tests let these through:\n" + "\n".join(problems))
    print("every planted mistake is caught and every alternative passes")


if __name__ == "__main__":
    run_cli(main)
