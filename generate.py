"""
Sampling: the language model run as the dynamical system of E1-E3, with or without an edit of its
state.

- `prefill` reads the prompts into the KV cache, the memory h_0, and gives the state o_0 (E1);
- `controlled_logits` and `next_state` are one step of the controlled system: o_t -> o_t + u_t ->
  logits (E2, E3), then the drawn token, never the edit, moves the state (E1);
- `sample` is the one decoding loop every method shares (RE-Control and static editing edit o_t,
  reward-guided decoding re-scores the logits);
- `sample_many` runs it over many prompts, a batch at a time, each response from a seed of its own.

Command line: responses of the base model, and of RE-Control with each --value, over prompts and
seeds; the mean reward of each, and every response as a JSON line with --out.

    python generate.py      # the toy world's model and test prompts; with --value, RE-Control too
    python generate.py --model toy --value out/toyworld/value.pt --out generations.jsonl
    python generate.py --model path/to/gpt2 --prompts prompts.txt --reward sentiment --value v.pt
    torchrun --standalone --nproc-per-node 8 generate.py --device cuda ...   # on 8 GPUs
"""

import os
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass

import torch

import worlds
from control import ControlConfig, Controller
from evaluation import report
from model import left_pad
from plumbing import parallel
from plumbing.checkpoints import check_dtype_and_device, load_value, model_fingerprint
from plumbing.cli import (add_config_arguments, add_task_arguments, checked, config_from_args,
                          in_flags, is_finite, is_whole, new_parser, require, run_cli, setting)
from plumbing.files import (Lock, check_not_an_input, check_overwrite, check_writable,
                            read_jsonl_made_by, remove_leftovers, write_jsonl)
from plumbing.prompts import prompts_digest
from plumbing.stop_strings import StopStrings
from plumbing.tokenizer import end_of_sequence_ids, named_tokens

# -----------------------------------------------------------------------------
# settings


@dataclass
class SamplingConfig:
    """How responses are drawn (E2). The loop reads the first six; sample_many and the scripts the
    last two."""
    max_new_tokens: int | None = setting(None, "longest response (default: what the context "
                                         "leaves after the longest prompt, at most 128)")
    temperature: float = setting(1.0, "tau of E2 (0: greedy)")
    top_k: int | None = setting(None, "keep the k most likely tokens")
    top_p: float | None = setting(None,
                                  "keep the smallest set of tokens whose probability reaches p")
    stop: tuple = setting((), "strings that end a response (e.g. 'Human:')")
    # tokens that end a response (None: the checkpoint's, else the tokenizer's)
    eos_ids: tuple | None = None
    samples_per_prompt: int = setting(1, "responses per prompt")
    batch_size: int = setting(64, "responses sampled together")

    def __post_init__(self):
        self.stop = tuple(self.stop)
        require((self.max_new_tokens is None or is_whole(self.max_new_tokens, 1),
                 f"max_new_tokens must be a whole number >= 1, got {self.max_new_tokens}"),
                (is_finite(self.temperature, 0),
                 f"temperature must be a number >= 0 (0: greedy), got {self.temperature}"),
                (self.top_k is None or is_whole(self.top_k, 1),
                 f"top_k must be a whole number >= 1, got {self.top_k}"),
                (self.top_p is None or is_finite(self.top_p, 0, strictly=True) and self.top_p <= 1,
                 f"top_p must be in (0, 1], got {self.top_p}"),
                (all(isinstance(s, str) and s for s in self.stop),
                 f"stop strings must not be empty, got {self.stop}"),
                (is_whole(self.samples_per_prompt, 1),
                 f"samples_per_prompt must be a whole number >= 1, got {self.samples_per_prompt}"),
                (is_whole(self.batch_size, 1),
                 f"batch_size must be a whole number >= 1, got {self.batch_size}"))


@dataclass
class Generation:
    tokens: list  # per row, the response token ids, cut before EOS / the stop string
    texts: list  # per row, the decoded response (None without a tokenizer)
    states: list | None = None  # per row, o_0 ... o_T (T+1, C) when record_states was asked for
    # per row, the mean per-token KL from the base model when record_kl was asked for
    kl: list | None = None
    # per row, True when it ended (EOS or a stop string), False when cut at the limit
    finished: list | None = None


def response_length(model, enc, prompts, max_new_tokens=None):
    """The number of new tokens to sample: max_new_tokens, or by default as many as the model's
    context leaves after the longest prompt, at most 128 (the paper's). Fails before sampling
    anything when they cannot fit."""
    lengths = [len(enc.encode(p, allowed_special="all")) for p in prompts]
    longest = max(range(len(prompts)), key=lengths.__getitem__)
    room = model.config.block_size - lengths[longest]
    if max_new_tokens is None:
        max_new_tokens = min(128, room)
    if max_new_tokens > room or max_new_tokens < 1:
        raise ValueError(f"prompt {longest + 1} has {lengths[longest]} tokens; with max_new_tokens "
                         f"{max_new_tokens} that exceeds the model's context of "
                         f"{model.config.block_size}; shorten the prompts or lower "
                         "--max-new-tokens")
    return max_new_tokens


# -----------------------------------------------------------------------------
# drawing a token (E2), one seed per response


def next_token(logits, temperature, top_k, top_p, uniform):
    """E2: y ~ softmax(logits / tau), optionally truncated to the top-k tokens or the top-p nucleus.

    uniform (B,) holds one number in (0, 1] per row, from the row's own stream (row_uniforms): the
    token drawn is the first whose cumulative probability reaches it (inverse-CDF sampling), so a
    row's draw depends on its own logits and its own seed, never on the other rows of the batch.
    """
    logits = logits.float()  # (B, vocab)
    if temperature == 0:  # greedy: the most likely token
        return logits.argmax(-1)
    logits = logits / temperature  # tau < 1 sharpens the distribution, tau > 1 flattens it
    if top_k:  # every token below the k-th largest logit is ruled out
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # keep the most likely tokens until their probability reaches top_p
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # tokens entirely beyond the nucleus
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    # ruled-out tokens (-inf) get probability 0; the sums in float64, so that one never gets a step
    # of its own
    cdf = logits.softmax(-1).to(wide_float(logits.device)).cumsum(-1)  # (B, vocab)
    if not torch.isfinite(cdf[:, -1]).all():
        raise ValueError("the next-token probabilities are not finite (NaN or inf logits: a "
                         "diverged edit or model)")
    threshold = uniform * cdf[:, -1]  # in (0, total]: the first token whose sum reaches it
    return torch.searchsorted(cdf, threshold[:, None]).squeeze(-1)


def row_seeds(seed, first_job, n):
    """The seeds of n rows that run jobs first_job, first_job + 1, ... (a job: one response to one
    prompt, numbered in prompt order): a function of the sampling seed and the job alone, so a
    response is the same whichever rows share its batch, whichever process draws it, wherever a
    resumed run restarts. 32 bits, as torch's CPU generator reads no more: the jobs of one seed get
    distinct seeds, and the sampling seeds 0, 1, 2 ... start 2^32 / phi (the golden ratio) apart."""
    return [(seed * 0x9E3779B9 + job) % 2**32 for job in range(first_job, first_job + n)]


def row_uniforms(seeds, n, device):
    """(B, n) numbers in (0, 1], row i from a generator seeded with seeds[i], drawn on the CPU for
    every device."""
    streams = [torch.rand(n, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(s)) for s in seeds]
    return (1 - torch.stack(streams)).to(device, wide_float(device))


def wide_float(device):
    """float64 for the draws, except on Apple's MPS, which has none (float32 there)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def kl_divergence(logits, base_logits, temperature):
    """KL(p || p_base) per row between the sampling distribution and the base model's, at
    temperature tau."""
    tau = temperature or 1.0
    logp, logq = (logits.float() / tau).log_softmax(-1), (base_logits.float() / tau).log_softmax(-1)
    # tokens removed from p (logp = -inf) add 0
    return (logp.exp() * (logp - logq)).nan_to_num().sum(-1)


# -----------------------------------------------------------------------------
# the controlled system, one step at a time (E1-E3)


def prefill(model, prompts, n_new):
    """E1: one forward pass over the prompts (lists of ids) fills a cache with room for n_new more
    tokens (the memory h_0) and gives o_0 (B, C), the state at each prompt's last token."""
    # (B, P): every row ends together
    idx, attention_mask = left_pad(prompts, model.wte.weight.device)
    B, P = idx.shape
    if P + n_new > model.config.block_size:
        raise ValueError(f"a prompt of {P} tokens plus {n_new} new tokens exceeds the context of "
                         f"{model.config.block_size}; shorten the prompt or lower max_new_tokens")
    cache = model.new_cache(B, P + n_new)
    return cache, model.states(idx, cache, attention_mask)[:, -1]  # o_0 (B, C)


def controlled_logits(model, o, edit, want_base):
    """E2 without an edit: logits W o_t. E3 with one: W (o_t + u_t), the edit computed from o_t
    alone. Returns (the logits to sample from (B, vocab), the base model's W o_t when there is no
    edit or want_base)."""
    # >>> exercise E3: base_logits = W o_t (no edit, or want_base); logits = W edit(o_t) (or base)
    base_logits = model.head(o) if edit is None or want_base else None
    logits = model.head(edit(o)) if edit is not None else base_logits
    # <<< exercise E3
    return logits, base_logits


def next_state(model, y, cache):
    """E1: (h_{t+1}, o_{t+1}) = f_LM(h_t, y_{t+1}): the token y (B,), not the edit, enters the
    memory."""
    # >>> exercise E3: the next state o_{t+1} (B, C): the model reads the token y through the cache
    return model.states(y[:, None], cache)[:, -1]  # (B, C)
    # <<< exercise E3


def end_tokens(model, tokenizer, config):
    """The tokens that end a response: config.eos_ids, else the checkpoint's, else the tokenizer's
    specials."""
    eos_ids = config.eos_ids
    if eos_ids is None:
        eos_ids = model.config.eos_token_ids or \
            (end_of_sequence_ids(tokenizer) if tokenizer is not None else [])
    return torch.tensor(list(eos_ids) or [-1], device=model.wte.weight.device)


@torch.no_grad()
def sample(model, prompts, config, tokenizer=None, seed=None, edit=None, rescore=None,
           record_states=False, record_kl=False):
    """Sample one response for each prompt (a list of token ids), all in one batch, with a
    preallocated cache.

    seed: one seed per row (row_seeds), or an int for row_seeds(seed, 0, B), or None for a random
    one. config: a SamplingConfig. edit, when given, maps the newest state o_t (B, C) to o_t + u_t
    before the head (E3); the cache never sees it. rescore(logits, tokens, cache), when given,
    rewrites the logits (B, vocab) of each step from the response tokens so far (B, t) and the cache
    (reward-guided decoding). record_states keeps o_0 ... o_T of every response (E1); record_kl the
    mean per-token KL from the base model's distribution. A response ends at an end-of-sequence
    token (end_tokens) or at a stop string.
    """
    n_new = config.max_new_tokens
    if n_new is None or n_new < 0:
        raise ValueError(f"max_new_tokens must be a number >= 0, got {n_new} (response_length "
                         "chooses one)")
    stops = StopStrings(tokenizer, config.stop, model.config.vocab_size, model.wte.weight.device)
    eos = end_tokens(model, tokenizer, config)
    if seed is None:
        seed = int(torch.randint(2**31, ()))  # from torch's global generator
    seeds = row_seeds(seed, 0, len(prompts)) if isinstance(seed, int) else list(seed)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one per prompt, or "
                         "one int")
    # (B, n_new): each row's numbers, whatever its batch
    uniforms = row_uniforms(seeds, n_new, eos.device)
    cache, o = prefill(model, prompts, n_new)
    B = o.shape[0]
    out = torch.zeros(B, n_new, dtype=torch.long, device=eos.device)  # the response tokens
    kl = torch.zeros(B, n_new, device=eos.device)  # KL from the base model at every step
    # response tokens kept per row
    length = torch.full((B,), n_new, dtype=torch.long, device=eos.device)
    done = torch.zeros(B, dtype=torch.bool, device=eos.device)  # rows whose response has ended
    trajectory, steps = [o], 0  # o_0, o_1, ... (kept for record_states)
    for t in range(n_new):
        logits, base_logits = controlled_logits(model, o, edit, record_kl)
        # reward-guided decoding re-scores candidate tokens (evaluation/baselines.py)
        if rescore is not None:
            logits = rescore(logits, out[:, :t], cache)
        # sampling from the base model itself: KL stays 0
        if record_kl and logits is not base_logits:
            kl[:, t] = kl_divergence(logits, base_logits, config.temperature)
        # E2 (B,)
        y = next_token(logits, config.temperature, config.top_k, config.top_p, uniforms[:, t])
        out[:, t], steps = y, t + 1
        ended = ~done & torch.isin(y, eos)  # the end-of-sequence token is not part of the response
        length[ended] = t
        done |= ended
        stops.cut(out, t, y, done, length)  # nor is a stop string
        if bool(done.all()) or (t == n_new - 1 and not record_states):
            break  # the last state o_T is only needed when the states are recorded
        o = next_state(model, y, cache)
        trajectory.append(o)
    return generation(prompts, tokenizer, out, length, done, trajectory if record_states else None,
                      kl[:, :steps] if record_kl else None)


def generation(prompts, tokenizer, out, length, done, trajectory, kl):
    """The Generation of a finished batch: each row's tokens up to its length, their text, and, when
    they were recorded, its states o_0 ... o_T and its mean KL per decision."""
    B = out.shape[0]
    tokens = [out[i, :length[i]].tolist() for i in range(B)]
    # the text a response adds to its prompt: decoded after the prompt, so that a leading space (a
    # sentencepiece piece "▁He") is kept and prompt text + response text is the text of prompt +
    # response tokens
    texts = [tokenizer.decode(p + r)[len(tokenizer.decode(p)):] for p, r in zip(prompts, tokens)] \
        if tokenizer is not None else [None] * B
    result = Generation(tokens=tokens, texts=texts, finished=done.tolist())
    if trajectory is not None:
        stacked = torch.stack(trajectory, dim=1)  # (B, steps+1, C)
        # o_0 ... o_T of each response
        result.states = [stacked[i, :length[i] + 1] for i in range(B)]
    if kl is not None:  # every decision of the response counts, the one that ended it included
        result.kl = [kl[i, :min(int(length[i]) + 1, kl.shape[1])].mean().item() for i in range(B)]
    return result


# -----------------------------------------------------------------------------
# many prompts, a batch at a time


def sample_many(model, enc, prompts, config, seed, reward_fn=None, edit=None, value=None,
                rescore_for=None, prefix=""):
    """One response to each of `prompts` (texts; repeat a prompt for several responses),
    config.batch_size at a time, response j from the seed row_seeds(seed, j, 1). Under torchrun each
    process samples every N-th batch, and every process gets every row, in order
    (parallel.map_batches).

    prefix is put before every prompt the model reads; rescore_for(batch's prompts) makes a batch's
    rescore hook (its `calls`, when it has them, count its reward calls). Returns rows (prompt,
    response, tokens, kl, finished; reward with reward_fn; values V(o_0) ... V(o_T) with value) and
    the cost: seconds of sampling, tokens generated, reward calls of the hooks.
    """
    def run(start, end):
        batch = prompts[start:end]
        rescore = rescore_for(batch) if rescore_for else None
        t0 = time.perf_counter()
        out = sample(model, [enc.encode(prefix + p, allowed_special="all") for p in batch], config,
                     tokenizer=enc, seed=row_seeds(seed, start, len(batch)), edit=edit,
                     rescore=rescore, record_kl=True, record_states=value is not None)
        cost = {"seconds": time.perf_counter() - t0, "tokens": sum(len(t) for t in out.tokens),
                "reward_calls": getattr(rescore, "calls", 0)}
        rows = [{"prompt": p, "response": text, "tokens": tokens, "kl": kl, "finished": finished}
                for p, text, tokens, kl,
                finished in zip(batch, out.texts, out.tokens, out.kl, out.finished)]
        if reward_fn is not None:
            for row, reward in zip(rows, reward_fn(batch, out.texts).tolist()):
                row["reward"] = reward
        if value is not None:  # V(o_t) along each response (V reads the states in fp32)
            for row, states in zip(rows, out.states):
                row["values"] = value(states).tolist()
        return rows, cost

    batches = parallel.map_batches(len(prompts), config.batch_size, run)
    return [row for rows, _ in batches for row in rows], \
        {key: sum(cost[key] for _, cost in batches) for key in ("seconds", "tokens",
                                                                "reward_calls")}


# -----------------------------------------------------------------------------
# command line


def add_sampling_arguments(parser, config):
    """The flags of SamplingConfig, `config`'s values their defaults; --eos names its end tokens by
    text."""
    add_config_arguments(parser, config)
    parser.add_argument("--eos", nargs="+", default=None,
                        help="tokens that end a response, by text ('</s>', '<s>' for TinyStories) "
                             "or id (default: the checkpoint's end-of-sequence tokens, else the "
                             "tokenizer's)")


def add_control_arguments(parser):
    """The flags of ControlConfig; each defaults to the setting calibrated and stored with V."""
    docs = {f: ControlConfig.__dataclass_fields__[f].metadata["help"] for f in ("step_size",
                                                                                "n_steps",
                                                                                "radius")}
    stored = " (default: as calibrated and stored with V, else the paper's)"
    parser.add_argument("--step-size", type=float, default=None, help=docs["step_size"] + stored)
    parser.add_argument("--n-steps", type=int, default=None, help=docs["n_steps"] + stored)
    parser.add_argument("--target", default="auto",
                        help="stop the ascent once V reaches this value: a number, 'none', or "
                             "'auto' (stored with V)")
    parser.add_argument("--l2", type=float, default=0.0,
                        help=ControlConfig.__dataclass_fields__["l2"].metadata[
        "help"])
    parser.add_argument("--radius", type=float, default=None, help=docs["radius"] + stored)


def control_from_args(args, stored):
    """The ControlConfig the flags ask for, the settings `stored` with V filling those they leave
    out."""
    return in_flags(ControlConfig,
                    lambda: ControlConfig.chosen(stored, args.step_size, args.n_steps,
                                                                args.radius, args.target, args.l2))


def script_parser(doc, prompts, sampling):
    """The parser of a script that samples a model on a task: its docstring as the description, the
    task's flags (`prompts`: the default prompt set) and the sampling flags with `sampling`'s values
    as defaults."""
    parser = new_parser(doc)
    add_task_arguments(parser, prompts)
    add_sampling_arguments(parser, sampling)
    return parser


def sampling_from_args(args, model, enc, prompts, config):
    """`config` with its length chosen for these prompts and its end tokens named by --eos."""
    for stop in config.stop:
        if stop in getattr(enc, "special_tokens_set", ()):
            raise ValueError(f"--stop {stop!r} is a special token's text, and special tokens do "
                             "not decode to text, so it would never match; name it with --eos "
                             f"{stop!r}")
    config.max_new_tokens = response_length(model, enc, prompts, config.max_new_tokens)
    config.eos_ids = named_tokens(enc, args.eos) if args.eos else None
    return config


def main(argv=None):
    parser = script_parser(__doc__, prompts="toy-test", sampling=SamplingConfig())
    parser.add_argument("--value", nargs="+", default=None,
                        help="value checkpoints from train_value.py; each adds a RE-Control row "
                             "(none: base model only)")
    add_control_arguments(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="sampling seeds; the table averages them")
    parser.add_argument("--examples", type=int, default=3,
                        help="prompts whose responses are printed")
    parser.add_argument("--out", default=None, help="write every response as a JSON line here")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an --out file that another run made")
    args = parser.parse_args(argv)

    def settings():  # every flag is checked before any work
        check_dtype_and_device(args.dtype, args.device)
        control_from_args(args, {})
        if args.out:
            check_writable(args.out)
            check_not_an_input(args.out,
                               {"prompt file": args.prompts, "value checkpoint": args.value})
            check_overwrite(args.out, None, read_jsonl_made_by, args.overwrite)
        return config_from_args(SamplingConfig, args)

    config = checked(parser, settings)
    args.device = parallel.start(args.device)  # under torchrun: join the other processes
    # one job at a time on --out, from before its check to after its write
    with ExitStack() as held:
        if args.out and parallel.is_main():
            held.enter_context(Lock(args.out))
            remove_leftovers(os.path.dirname(os.path.abspath(args.out)))
        return sample_and_write(args, config)


def sample_and_write(args, config):
    """generate.py's job once its flags are checked: every method over prompts and seeds, reported,
    written."""
    reward_fn = worlds.load_reward(args.reward, device=args.device)
    prompts = worlds.load_prompts(args.prompts, args.chat)
    model, enc = worlds.load_model(args.model, dtype=args.dtype, device=args.device,
                                   tokenizer=args.tokenizer)
    config = sampling_from_args(args, model, enc, prompts, config)
    values = {path: load_value(path, model, args.model, args.reward) for path in args.value or []}
    controls = {path: control_from_args(args, checkpoint.get("control") or {})
                for path, (_, checkpoint) in values.items()}
    made_by = {"tool": "generate.py", "model": args.model,
               "base_fingerprint": model_fingerprint(model),
               "prompts": prompts_digest(prompts), "reward": args.reward,
               "sampling": asdict(config),
               "values": args.value, "controls": [asdict(c) for c in controls.values()],
               "seeds": args.seeds}
    if args.out:
        check_overwrite(args.out, made_by, read_jsonl_made_by, args.overwrite)
    first_value = next(iter(values.values()))[0] if values else None
    methods = {"base": (None, first_value)}  # name: (edit, the value recorded along the responses)
    for path, (value, _) in values.items():
        name = f"RE-Control ({path})" if len(values) > 1 else "RE-Control"
        print(f"{name}: {controls[path]}")
        methods[name] = (Controller(value, controls[path]), value)
    jobs = [p for p in prompts for _ in range(config.samples_per_prompt)]
    runs = {name: [sample_many(model, enc, jobs, config, seed, reward_fn, edit,
                               value) for seed in args.seeds]
            for name, (edit, value) in methods.items()}
    if not parallel.is_main():  # under torchrun, rank 0 alone reports and writes
        return []
    summaries, records = report.evaluate(runs, args.seeds, model, enc,
                                         worlds.grammar_check(args.reward))
    report.print_report(summaries, records, examples=args.examples)
    if args.out:
        write_jsonl(args.out, records, made_by)
    return summaries


if __name__ == "__main__":
    run_cli(main)
