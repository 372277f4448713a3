"""
Sampling: the language model run as the dynamical system of E1-E3, with or without a control, and the command line
that puts the base model and RE-Control side by side (E8).

- `sample` is the one decoding loop that every method shares: prefill the prompt (E1), then at every step read
  the state o_t, let a plug-in edit it (E3: RE-Control, static editing) or re-score the logits (reward-guided
  decoding), draw the next token (E2), and feed the token, never the edit, back into the KV cache (E1).
- `Method` and `sample_responses` run one way of sampling over prompts and seeds; `evaluate_methods` makes the
  table of rewards and fluency of several of them.

    python generate.py      # the embedded toy world: its base model and test prompts; with --value, RE-Control too
    python generate.py --model toy --value out/toyworld/value.pt --out generations.jsonl
    python generate.py --model path/to/gpt2 --prompts prompts.txt --reward sentiment --value gpt2_value.pt \\
        --step-size 0.5 --n-steps 30
    torchrun --standalone --nproc-per-node 8 generate.py --device cuda ...   # the same job on 8 GPUs (parallel.py)
"""

import json
import time
import weakref
from dataclasses import asdict, dataclass

import torch

import metrics
import parallel
from baselines import CountingReward
from checkpoints import check_overwrite, write_text_atomically
from cli import (SAMPLING_FLAGS, add_control_arguments, check_not_an_input, checked, config_from_args, is_finite,
                 is_whole, require, run_cli, script_parser)
from control import ControlConfig, Controller
from model import left_pad
from tasks import (check_prompts_fit, check_task_flags, grammar_check, load_model, load_prompts, load_reward,
                   named_tokens, prompts_digest)
from tokenizer import end_of_sequence_ids
from value import load_value, model_fingerprint

# -----------------------------------------------------------------------------
# settings


@dataclass
class SamplingConfig:
    """How responses are drawn. The loop reads the first six; the last two say how many and how many at once."""
    max_new_tokens: int | None = None  # longest response; None: chosen from the context by tasks.check_prompts_fit
    temperature: float = 1.0  # tau of E2; 0 is greedy
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set of tokens whose probability reaches p (the nucleus)
    stop: tuple = ()  # strings that end a response (e.g. "Human:")
    eos_ids: tuple | None = None  # tokens that end a response; None: the checkpoint's, else the tokenizer's
    samples_per_prompt: int = 1
    batch_size: int = 64  # responses sampled together

    def __post_init__(self):
        self.stop = tuple(self.stop)
        require((self.max_new_tokens is None or is_whole(self.max_new_tokens, 1),
                 f"--max-new-tokens must be a whole number >= 1, got {self.max_new_tokens}"),
                (is_finite(self.temperature, 0),
                 f"--temperature must be a number >= 0 (0: greedy), got {self.temperature}"),
                (self.top_k is None or is_whole(self.top_k, 1),
                 f"--top-k must be a whole number >= 1, got {self.top_k}"),
                (self.top_p is None or is_finite(self.top_p, 0, strictly=True) and self.top_p <= 1,
                 f"--top-p must be in (0, 1], got {self.top_p}"),
                (all(isinstance(s, str) and s for s in self.stop),
                 f"--stop strings must not be empty, got {self.stop}"),
                (is_whole(self.samples_per_prompt, 1),
                 f"--samples-per-prompt must be a whole number >= 1, got {self.samples_per_prompt}"),
                (is_whole(self.batch_size, 1), f"--batch-size must be a whole number >= 1, got {self.batch_size}"))

    @classmethod
    def from_args(cls, args):
        """The settings of an argparse namespace built with cli.add_sampling_arguments."""
        return config_from_args(cls, args, SAMPLING_FLAGS)


@dataclass
class Generation:
    tokens: list  # per row, the response token ids, cut before EOS / the stop string
    texts: list  # per row, the decoded response (None without a tokenizer)
    states: list | None = None  # per row, o_0 ... o_T (T+1, C) when record_states was asked for
    kl: list | None = None  # per row, the mean per-token KL from the base model when record_kl was asked for
    finished: list | None = None  # per row, True when it ended (EOS or a stop string), False when cut at the limit


# -----------------------------------------------------------------------------
# one step: logits -> next token


def next_token(logits, temperature, top_k, top_p, uniform):
    """E2: y ~ softmax(logits / tau), optionally truncated to the top-k tokens or the top-p nucleus.

    uniform (B,) holds one number in (0, 1] per row, from the row's own stream (row_uniforms): the token drawn is the
    first whose cumulative probability reaches it (inverse-CDF sampling), so a row's draw depends on its own logits
    and its own seed, never on the other rows of the batch.
    """
    logits = logits.float()  # (B, vocab)
    if temperature == 0:  # greedy: the most likely token
        return logits.argmax(-1)
    logits = logits / temperature  # tau < 1 sharpens the distribution, tau > 1 flattens it
    if top_k:  # every token below the k-th largest logit is ruled out
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:  # keep the most likely tokens until their probability reaches top_p
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # tokens entirely beyond the nucleus
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    # ruled-out tokens (-inf) get probability 0; the sums in float64, so that one never gets a step of its own
    cdf = logits.softmax(-1).to(wide_float(logits.device)).cumsum(-1)  # (B, vocab)
    if not torch.isfinite(cdf[:, -1]).all():
        raise ValueError("the next-token probabilities are not finite (NaN or inf logits: a diverged edit or model)")
    threshold = uniform * cdf[:, -1]  # in (0, total]: the first token whose sum reaches it
    return torch.searchsorted(cdf, threshold[:, None]).squeeze(-1)


def row_seeds(seed, first_job, n):
    """The seeds of n rows that run jobs first_job, first_job + 1, ... (a job: one response to one prompt, numbered
    in prompt order): a function of the sampling seed and the job alone, so a response is the same whichever rows
    share its batch, whichever process draws it, wherever a resumed run restarts. 32 bits, as torch's CPU generator
    reads no more: the jobs of one seed get distinct seeds, and the sampling seeds 0, 1, 2 ... start 2^32 / phi
    (the golden ratio) apart."""
    return [(seed * 0x9E3779B9 + job) % 2**32 for job in range(first_job, first_job + n)]


def row_uniforms(seeds, n, device):
    """(B, n) numbers in (0, 1], row i from a generator seeded with seeds[i], drawn on the CPU for every device."""
    streams = [torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return (1 - torch.stack(streams)).to(device, wide_float(device))


def wide_float(device):
    """float64 for the draws, except on Apple's MPS, which has none (float32 there)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def kl_divergence(logits, base_logits, temperature):
    """KL(p || p_base) per row between the sampling distribution and the base model's, at temperature tau."""
    tau = temperature or 1.0
    logp, logq = (logits.float() / tau).log_softmax(-1), (base_logits.float() / tau).log_softmax(-1)
    return (logp.exp() * (logp - logq)).nan_to_num().sum(-1)  # tokens removed from p (logp = -inf) add 0


FINISHERS = weakref.WeakKeyDictionary()  # tokenizer -> {stop strings: the token ids that can complete one}


def token_text(tokenizer, i):
    """The text of token i alone; "\ufffd" for an id the tokenizer cannot decode (a model's vocabulary can be
    padded beyond its tokenizer's)."""
    try:
        return tokenizer.decode([i])
    except (KeyError, ValueError, IndexError):
        return "\ufffd"


def stop_finishers(tokenizer, stop_strings, vocab_size, device):
    """The ids of the tokens that can complete a stop string: those whose text holds the last character of one, and
    those that are a byte of a longer character ("\ufffd" alone). Every token, when a stop string ends in white
    space: a decoder may drop a token's leading space when it reads the token alone (sentencepiece's "▁he").
    Only a row that draws one of them is read."""
    cache = FINISHERS.setdefault(tokenizer, {})
    if (stop_strings, vocab_size) not in cache:
        ends = {s[-1] for s in stop_strings} | {"\ufffd"}
        cache[stop_strings, vocab_size] = [i for i in range(vocab_size) if any(c.isspace() for c in ends)
                                           or any(c in token_text(tokenizer, i) for c in ends)]
    return torch.tensor(cache[stop_strings, vocab_size] or [-1], device=device)


def cut_at_stop(tokens, enc, stop_strings):
    """The longest token prefix whose text ends before the first stop string (None: no stop string in it)."""
    text = enc.decode(tokens)
    hits = [text.find(s) for s in stop_strings if s in text]
    if not hits:
        return None
    end = min(hits)  # the first character of the earliest stop string
    n = len(tokens)
    while n and len(enc.decode(tokens[:n])) > end:
        n -= 1
    return n


# -----------------------------------------------------------------------------
# the loop


@torch.no_grad()
def sample(model, prompts, config, tokenizer=None, seed=None, edit=None, rescore=None, record_states=False,
           record_kl=False):
    """Sample one response for each prompt (a list of token ids), all in one batch, with a preallocated KV cache.

    seed: one seed per row (row_seeds), or an int for row_seeds(seed, 0, B), or None for a random one.
    config: a SamplingConfig. edit, when given, maps the newest state o_t (B, C) to o_t + u_t before the head (E3);
    the cache never sees it. rescore(logits, tokens, cache), when given, rewrites the logits (B, vocab) of each step
    from the response tokens so far (B, t) and the cache (reward-guided decoding). record_states keeps o_0 ... o_T
    of every response (E1); record_kl the mean per-token KL from the base model's next-token distribution.
    A response ends at an end-of-sequence token (config.eos_ids) or at a stop string.
    """
    n_new = config.max_new_tokens
    if n_new is None or n_new < 0:
        raise ValueError(f"max_new_tokens must be a number >= 0, got {n_new} (tasks.check_prompts_fit chooses one)")
    if config.stop and tokenizer is None:
        raise ValueError("stop strings need the tokenizer to read the text")
    device = model.wte.weight.device
    eos_ids = config.eos_ids
    if eos_ids is None:  # the checkpoint's own, else the end-of-sequence specials the tokenizer knows
        eos_ids = model.config.eos_token_ids or (end_of_sequence_ids(tokenizer) if tokenizer is not None else [])
    eos = torch.tensor(list(eos_ids) or [-1], device=device)
    if seed is None:
        seed = int(torch.randint(2**31, ()))  # from torch's global generator
    seeds = row_seeds(seed, 0, len(prompts)) if isinstance(seed, int) else list(seed)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one per prompt, or one int")
    uniforms = row_uniforms(seeds, n_new, device)  # (B, n_new): each row's random numbers, whatever its batch

    # E1, the prefill: one forward pass over the prompts fills the cache (h_0) and gives o_0 at each last token
    idx, attention_mask = left_pad(prompts, device)  # (B, P), padded on the left so every row ends together
    B, P = idx.shape
    if P + n_new > model.config.block_size:
        raise ValueError(f"a prompt of {P} tokens plus {n_new} new tokens exceeds the context of "
                         f"{model.config.block_size}; shorten the prompt or lower max_new_tokens")
    cache = model.new_cache(B, P + n_new)
    o = model.states(idx, cache, attention_mask)[:, -1]  # (B, C): o_0

    out = torch.zeros(B, n_new, dtype=torch.long, device=device)  # the response tokens
    kl = torch.zeros(B, n_new, device=device)  # KL from the base model at every step
    length = torch.full((B,), n_new, dtype=torch.long, device=device)  # response tokens kept per row
    done = torch.zeros(B, dtype=torch.bool, device=device)  # rows whose response has ended
    trajectory = [o]  # o_0, o_1, ... (kept for record_states)
    if config.stop:
        # tokens enough to hold any stop string: each token is at least one byte, and the window may start mid-character
        window = max(len(s.encode("utf-8")) for s in config.stop) + 4
        finishers = stop_finishers(tokenizer, config.stop, model.config.vocab_size, device)
    steps = 0
    for t in range(n_new):
        # E2 without a control: logits W o_t. E3 with one: W (o_t + u_t), the edit computed from o_t alone.
        # >>> exercise E3: base_logits = W o_t (when there is no edit, or the KL is recorded), logits = W edit(o_t)
        base_logits = model.head(o) if edit is None or record_kl else None  # the base model's, for the KL
        logits = model.head(edit(o)) if edit is not None else base_logits  # (B, vocab)
        # <<< exercise E3
        if rescore is not None:  # reward-guided decoding re-scores candidate tokens (baselines.py)
            logits = rescore(logits, out[:, :t], cache)
        if record_kl and logits is not base_logits:  # sampling from the base model itself: KL stays 0
            kl[:, t] = kl_divergence(logits, base_logits, config.temperature)
        # E2: draw y_{t+1} from the (edited) distribution
        y = next_token(logits, config.temperature, config.top_k, config.top_p, uniforms[:, t])  # (B,)
        out[:, t] = y
        steps = t + 1
        # a row ends at its first end-of-sequence token, which is not part of the response...
        ended = ~done & torch.isin(y, eos)
        length[ended] = t
        done |= ended
        # ...or where its text first contains a stop string (the response is cut before it): only rows whose new
        # token can complete one are read, and only their newest tokens, enough to hold the longest stop string
        if config.stop:
            for i in (~done & torch.isin(y, finishers)).nonzero().flatten().tolist():
                if any(s in tokenizer.decode(out[i, max(0, t + 1 - window):t + 1].tolist()) for s in config.stop):
                    n = cut_at_stop(out[i, :t + 1].tolist(), tokenizer, config.stop)
                    if n is not None:
                        length[i], done[i] = n, True
        if bool(done.all()) or (t == n_new - 1 and not record_states):
            break  # the last state o_T is only needed when the states are recorded
        # E1: the token, not the edit, enters the memory: (h_{t+1}, o_{t+1}) = f_LM(h_t, y_{t+1})
        # >>> exercise E3: the next state o_{t+1} (B, C): the model reads the token y through the cache
        o = model.states(y[:, None], cache)[:, -1]  # (B, C)
        # <<< exercise E3
        trajectory.append(o)

    tokens = [out[i, :length[i]].tolist() for i in range(B)]
    # the text a response adds to its prompt: decoded after the prompt, so that a leading space (a sentencepiece
    # piece "▁He") is kept and prompt text + response text is the text of prompt + response tokens
    texts = [tokenizer.decode(p + r)[len(tokenizer.decode(p)):] for p, r in zip(prompts, tokens)] \
        if tokenizer is not None else [None] * B
    generation = Generation(tokens=tokens, texts=texts, finished=done.tolist())
    if record_states:
        stacked = torch.stack(trajectory, dim=1)  # (B, steps+1, C)
        generation.states = [stacked[i, :length[i] + 1] for i in range(B)]  # o_0 ... o_T of each response
    if record_kl:  # every decision of the response counts, the one that ended it included
        generation.kl = [kl[i, :min(int(length[i]) + 1, steps)].mean().item() for i in range(B)]
    return generation


# -----------------------------------------------------------------------------
# methods over prompts and seeds


@dataclass
class Method:
    """A way to sample: the base model, or it with one of the plug-ins of `sample` (see baselines.py)."""
    name: str
    edit: object = None  # o_t -> o_t + u_t (RE-Control, static editing)
    guide: object = None  # (prompts, counting reward) -> a rescore hook (reward-guided decoding)
    instruction: str = ""  # prepended to every prompt (prompting)
    best_of: int = 1  # N of best-of-N: the reward keeps the best of N samples
    value: object = None  # a value function: V(o_t) is recorded along every response


def sample_responses(method, model, enc, prompts, reward_fn, config, seed):
    """config.samples_per_prompt responses per prompt with `method`, config.batch_size at a time; under torchrun each
    process samples every N-th batch (parallel.map_batches), and every process gets every row, in prompt order.

    Returns rows (prompt, response, tokens, reward, kl, finished; with the method's value, V(o_t) along the
    response) and the method's cost: seconds of sampling, tokens generated (discarded best-of-N samples included)
    and its own reward calls (not the final scoring).
    """
    jobs = [p for p in prompts for _ in range(config.samples_per_prompt)]

    def run(start, end):
        batch = jobs[start:end]
        counting = CountingReward(reward_fn)
        expanded = [p for p in batch for _ in range(method.best_of)]
        ids = [enc.encode(method.instruction + p, allowed_special="all") for p in expanded]
        t0 = time.perf_counter()
        out = sample(model, ids, config, tokenizer=enc, seed=row_seeds(seed, start * method.best_of, len(expanded)),
                     edit=method.edit, rescore=method.guide(expanded, counting) if method.guide else None,
                     record_kl=True, record_states=method.value is not None)
        chosen = list(range(len(batch)))
        if method.best_of > 1:
            scores = counting(expanded, out.texts).view(len(batch), method.best_of)
            chosen = (torch.arange(len(batch)) * method.best_of + scores.argmax(1)).tolist()
        cost = {"seconds": time.perf_counter() - t0, "tokens": sum(len(t) for t in out.tokens),
                "reward_calls": counting.calls}
        rewards = reward_fn(batch, [out.texts[i] for i in chosen]).tolist()
        rows = [{"prompt": p, "response": out.texts[i], "tokens": out.tokens[i], "kl": out.kl[i],
                 "finished": out.finished[i], "reward": reward} for p, i, reward in zip(batch, chosen, rewards)]
        if method.value is not None:  # V(o_t) along each response, o_0 ... o_T
            for row, i in zip(rows, chosen):
                row["values"] = method.value(out.states[i]).tolist()  # V reads the state in fp32
        return rows, cost

    batches = parallel.map_batches(len(jobs), config.batch_size, run)
    return [row for rows, _ in batches for row in rows], {k: sum(cost[k] for _, cost in batches) for k in batches[0][1]}


def evaluate_methods(methods, model, enc, prompts, reward_fn, config, seeds, is_grammatical=None):
    """Every method on every prompt for every seed (E8). Returns one summary row per method (metrics.summarize_runs)
    and every response as a record: method, seed, prompt, response, reward, KL, and with the method's value the
    values of the response's first and last states, with `is_grammatical` the toy grammar's verdict.
    Under torchrun the processes share the sampling; rank 0 alone makes the summaries (the other ranks get [])."""
    summaries, records = [], []
    for method in methods:
        runs = [sample_responses(method, model, enc, prompts, reward_fn, config, seed) for seed in seeds]
        if parallel.is_main():
            summaries.append(metrics.summarize_runs(method.name, runs, model, enc, is_grammatical))
        for seed, (rows, _) in zip(seeds, runs):
            for row in rows:
                record = {"method": method.name, "seed": seed, "prompt": row["prompt"], "response": row["response"],
                          "tokens": row["tokens"], "finished": row["finished"], "reward": row["reward"],
                          "kl": row["kl"]}
                if method.value is not None:  # the value of the first and the last state of the response
                    record["value_start"], record["value_end"] = row["values"][0], row["values"][-1]
                if is_grammatical is not None:
                    record["grammatical"] = is_grammatical(row["response"])
                records.append(record)
    return summaries, records


TABLE = ["method", "reward", "reward_sd_seeds", "reward_sd_responses", "grammatical", "perplexity", "coherence",
         "diversity", "kl", "cut", "tokens_per_s"]


def print_report(summaries, records=(), examples=0):
    """The table; with a base model and one other method, the gain in units of the base model's spread;
    the first `examples` prompts' responses of the first seed, method beside method."""
    print(metrics.markdown_table(summaries, TABLE))
    if len(summaries) == 2 and summaries[0]["method"] == "base":
        base, other = summaries
        gain = other["reward"] - base["reward"]
        print(f"gain {gain:+.3f} = {gain / max(base['reward_sd_responses'], 1e-9):.2f} sd of the base model's "
              f"per-response reward; seed-to-seed spread {max(base['reward_sd_seeds'], other['reward_sd_seeds']):.3f}")
    first_seed = records[0]["seed"] if records else None
    shown = list(dict.fromkeys(r["prompt"] for r in records))[:examples]
    for prompt in shown:
        print(f"\n{prompt}")
        for r in records:
            if r["prompt"] == prompt and r["seed"] == first_seed:
                print(f"  {r['method']:>12} {r['reward']:+.2f}  {r['response']!r}")


def write_jsonl(path, records, made_by):
    """Every response as a JSON line, after a first line {"made_by": ...} that records the settings that made them."""
    lines = [json.dumps({"made_by": made_by})] + [json.dumps(record) for record in records]
    write_text_atomically(path, "\n".join(lines) + "\n")
    print(f"wrote {len(records)} responses to {path}")


def read_jsonl_made_by(path):
    with open(path) as f:
        return json.loads(f.readline())["made_by"]


def main(argv=None):
    parser = script_parser(__doc__, prompts="toy-test", sampling=SamplingConfig())
    parser.add_argument("--value", nargs="+", default=None,
                        help="value checkpoints from train_value.py; each adds a RE-Control row "
                             "(none: base model only)")
    add_control_arguments(parser)
    parser.add_argument("--sweep", type=float, nargs="*", default=None,
                        help="instead of one setting, run each alpha*n given here (n, radius and target as set)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds; the table averages them")
    parser.add_argument("--examples", type=int, default=3, help="prompts whose responses are printed")
    parser.add_argument("--out", default=None, help="write every response as a JSON line here")
    parser.add_argument("--overwrite", action="store_true", help="replace an --out file that another run made")
    args = parser.parse_args(argv)

    def settings():  # every flag is checked before any work
        require((args.sweep is None or bool(args.value), "--sweep needs --value"))
        check_task_flags(args)
        ControlConfig.chosen({}, args.step_size, args.n_steps, args.radius, args.target, args.l2)
        if args.out:
            check_not_an_input(args.out, {"prompt file": args.prompts, "value checkpoint": args.value})
            check_overwrite(args.out, None, read_jsonl_made_by, args.overwrite)
        return SamplingConfig.from_args(args)

    config = checked(parser, settings)
    args.device = parallel.start(args.device)  # under torchrun: join the other processes
    reward_fn = load_reward(args.reward, device=args.device)
    prompts = load_prompts(args.prompts, args.chat)
    model, enc = load_model(args.model, dtype=args.dtype, device=args.device)
    config.max_new_tokens = check_prompts_fit(model, enc, prompts, config.max_new_tokens)
    config.eos_ids = named_tokens(enc, args.eos) if args.eos else None
    values = {path: load_value(path, model, args.model, args.reward) for path in args.value or []}
    controls = {path: ControlConfig.chosen(checkpoint.get("control") or {}, args.step_size, args.n_steps, args.radius,
                                           args.target, args.l2) for path, (_, checkpoint) in values.items()}
    made_by = {"tool": "generate.py", "model": args.model, "base_fingerprint": model_fingerprint(model),
               "prompts": prompts_digest(prompts), "reward": args.reward, "sampling": asdict(config),
               "values": args.value, "controls": [asdict(c) for c in controls.values()], "sweep": args.sweep,
               "seeds": args.seeds}
    if args.out:
        check_overwrite(args.out, made_by, read_jsonl_made_by, args.overwrite)
    first_value = next(iter(values.values()))[0] if values else None
    methods = [Method("base", value=first_value)] if args.sweep is None else []
    for path, (value, _) in values.items():
        control = controls[path]
        suffix = f" ({path})" if len(values) > 1 else ""
        print(f"RE-Control{suffix}: {control}")
        if args.sweep is not None:
            methods += [Method(f"alpha*n = {total:g}{suffix}", Controller.from_config(value, control.with_total(total)),
                               value=value) for total in args.sweep]
        else:
            methods.append(Method(f"RE-Control{suffix}", Controller.from_config(value, control), value=value))
    summaries, records = evaluate_methods(methods, model, enc, prompts, reward_fn, config, args.seeds,
                                          grammar_check(args.reward))
    if parallel.is_main():
        print_report(summaries, records, examples=args.examples if args.sweep is None else 0)
        if args.out:
            write_jsonl(args.out, records, made_by)
    return summaries


if __name__ == "__main__":
    run_cli(main)
