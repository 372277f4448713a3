"""
RE-Control (Kong et al., NeurIPS 2024): align a language model at test time by editing its representation.

- Controller (docs/method.md, E7): at every decoding step, gradient ascent on the value V_phi(o_t + u) moves the
  newest state o_t by u before the LM head reads it (E3). It plugs into model.generate as `edit`, so plain
  and controlled sampling share one loop, and u never enters the KV cache.
- Rollouts (E1, E6): the base model samples responses and records o_0 ... o_T of each; the reward scores
  them; shards on disk keep them (fp16) for value training, and a long collection resumes where it stopped.

    python recontrol.py      # the whole method on the embedded toy world, no downloads (2.5 min the first time)
"""

import argparse
import json
import math
import os
import random
import time

import torch

from model import generate, write_atomically, write_text_atomically

# -----------------------------------------------------------------------------
# the controller


class Controller:
    """E7: u <- u + alpha * grad_u [V(o + u) - l2 * ||u||^2], at most n steps from u = 0; returns o + u.

    Works on the newest state only, (B, C); batched (each row gets its own u, since V is applied row-wise and
    the rows' objectives are summed); in fp32 whatever the model's dtype; the value network stays frozen.

    radius: keep the edit small relative to the state, ||u|| <= radius * ||o|| (a projection after each step).
    target: steer to a value, not by a fixed distance (as PRE-CONTROL does). A row stops its ascent at the first
    step where V(o + u) >= target, so a state that already looks good is left alone and a steep V cannot push
    far past the states the model visits. None: always n steps, the paper's E7.
    """

    def __init__(self, value, step_size=0.5, n_steps=30, l2=0.0, radius=None, target=None):
        if not (step_size >= 0 and n_steps >= 0 and l2 >= 0):  # also refuses NaN
            raise ValueError(f"the control needs step size >= 0, steps >= 0 and l2 >= 0; got step size "
                             f"{step_size}, {n_steps} steps, l2 {l2}")
        if int(n_steps) != n_steps:
            raise ValueError(f"the number of control steps must be a whole number, got {n_steps}")
        if radius is not None and not radius > 0:
            raise ValueError(f"the radius must be > 0 (or None for no limit), got {radius}")
        if target is not None and not math.isfinite(target):
            raise ValueError(f"the target value must be a finite number (or None), got {target}")
        self.value, self.step_size, self.n_steps, self.l2 = value, step_size, int(n_steps), l2
        self.radius, self.target = radius, target
        self.steps_taken = 0  # ascent steps summed over rows and calls: what the early stop saves

    def control(self, o):
        """u (B, C) for states o (B, C)."""
        o = o.detach().float()
        u = torch.zeros_like(o)
        active = torch.ones(o.shape[0], dtype=torch.bool, device=o.device)  # rows still climbing
        with torch.enable_grad():  # generation runs under no_grad; the inner loop needs gradients for u only
            for _ in range(self.n_steps):
                u.requires_grad_(True)
                v = self.value(o + u)  # (B,)
                if self.target is not None:
                    active &= v.detach() < self.target  # reached the target: this row stops for good
                    if not active.any():
                        break
                objective = v.sum() - self.l2 * (u ** 2).sum()  # E4's trade-off, per row
                (grad,) = torch.autograd.grad(objective, u)
                u = (u + self.step_size * grad * active[:, None]).detach()
                self.steps_taken += int(active.sum())
                if self.radius is not None:  # projection onto the ball ||u|| <= radius * ||o||
                    limit = self.radius * o.norm(dim=-1, keepdim=True)
                    u = u * (limit / u.norm(dim=-1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0)
        return u

    def __call__(self, o):
        if self.n_steps == 0 or self.step_size == 0:
            return o  # exactly the base model
        return (o.float() + self.control(o)).to(o.dtype)  # E3: the head reads o_t + u_t


# -----------------------------------------------------------------------------
# choosing the strength of the control on validation prompts

RADII = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0)  # radius * ||o|| tried by calibrate_control


def calibrate_control(model, enc, prompts, value, reward_fn, step_size=3.2, n_steps=20, target=None, kl_budget=0.1,
                      is_grammatical=None, min_grammar_ratio=0.95, samples_per_prompt=16, batch_size=64,
                      max_new_tokens=32, temperature=1.0, top_k=None, top_p=None, stop_strings=(), seed=0,
                      radii=RADII, log=print):
    """Choose how far E7 may move the state, on validation prompts: the largest radius (||u|| <= radius * ||o||),
    tried smallest first, whose mean per-token KL from the base model stays within `kl_budget` (and, with a
    grammar check, whose grammatical fraction stays >= min_grammar_ratio x the base model's).
    Returns (radius or None when even the smallest breaks the budget, the curve it came from).

    The radius, not alpha, is the knob: alpha * grad V moves the state by an amount that depends on how steep this
    particular V is (and so on the machine and the seed that trained it), while the radius is a distance in the
    state's own units. The prompts must be validation prompts (never the test prompts): this is a choice of a
    hyper-parameter. The sweep stops at the first radius over budget, so a noisy pass further on is never taken.
    """
    jobs = [enc.encode(p, allowed_special="all") for p in prompts for _ in range(samples_per_prompt)]
    texts_of = [p for p in prompts for _ in range(samples_per_prompt)]

    def sample(edit):
        texts, kls = [], []
        for b in range(0, len(jobs), batch_size):
            out = generate(model, jobs[b:b + batch_size], max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, stop_strings=stop_strings, tokenizer=enc, seed=seed * 1_000_003 + b,
                           edit=edit, record_kl=True)
            texts += out.texts
            kls += out.kl
        point = {"kl": sum(kls) / len(kls), "reward": reward_fn(texts_of, texts).float().mean().item()}
        if is_grammatical is not None:
            point["grammatical"] = sum(map(is_grammatical, texts)) / len(texts)
        return point

    base = sample(None)
    curve, chosen = [{"radius": 0, **base, "ok": True}], None
    for radius in radii:
        point = sample(Controller(value, step_size, n_steps, radius=radius, target=target))
        point["ok"] = point["kl"] <= kl_budget and (is_grammatical is None or
                                                    point["grammatical"] >= min_grammar_ratio * base["grammatical"])
        curve.append({"radius": radius, **point})
        grammar = f", grammatical {point['grammatical']:.1%}" if is_grammatical else ""
        log(f"calibration: radius {radius:<4g} | reward {point['reward']:+.3f} (base {base['reward']:+.3f}) | "
            f"KL/token {point['kl']:.3f}{grammar} | {'within budget' if point['ok'] else 'over budget: stop'}")
        if not point["ok"]:
            break
        chosen = radius
    return chosen, curve


# -----------------------------------------------------------------------------
# rollouts: states of the base model's own responses, with their rewards


def collect_rollouts(model, enc, prompts, reward_fn, folder, samples_per_prompt=4, batch_size=64,
                     max_new_tokens=64, temperature=1.0, top_k=None, top_p=None, stop_strings=(), seed=0,
                     shard_size=512, log=print):
    """Sample `samples_per_prompt` responses per prompt with the base model, keep o_0 ... o_T (E1) and R.

    Shards of `shard_size` responses are written atomically to `folder`; an interrupted collection with the
    same settings resumes at the first missing shard (each shard has its own seed, so results do not depend on
    where it stopped).
    """
    settings = dict(n_prompts=len(prompts), prompts_head=prompts[:3], samples_per_prompt=samples_per_prompt,
                    max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    stop_strings=list(stop_strings), seed=seed, shard_size=shard_size, width=model.config.n_embd)
    os.makedirs(folder, exist_ok=True)
    meta_path = os.path.join(folder, "rollouts.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f)["settings"] != settings:
                raise ValueError(f"{folder} holds rollouts collected with other settings (model, prompts or "
                                 "sampling); pass another --rollouts folder, or delete this one")
    jobs = [(i, k) for i in range(len(prompts)) for k in range(samples_per_prompt)]  # (prompt, sample)
    n_shards = math.ceil(len(jobs) / shard_size)
    write_text_atomically(meta_path, json.dumps({"settings": settings, "n_shards": n_shards}))
    t0, done = time.time(), 0
    for s in range(n_shards):
        path = os.path.join(folder, f"shard_{s:05d}.pt")
        if os.path.exists(path):
            continue
        shard_jobs = jobs[s * shard_size:(s + 1) * shard_size]
        states, lengths, texts = [], [], []
        for b in range(0, len(shard_jobs), batch_size):
            batch = [prompts[i] for i, _ in shard_jobs[b:b + batch_size]]
            out = generate(model, [enc.encode(p, allowed_special="all") for p in batch], max_new_tokens,
                           temperature=temperature, top_k=top_k, top_p=top_p, stop_strings=stop_strings,
                           tokenizer=enc, seed=seed * 1_000_003 + s * 1009 + b, record_states=True)
            states += [x.half().cpu() for x in out.states]
            lengths += [x.shape[0] for x in out.states]
            texts += out.texts
        prompt_index = [i for i, _ in shard_jobs]
        rewards = reward_fn([prompts[i] for i in prompt_index], texts).float()
        shard = {"states": torch.cat(states), "lengths": torch.tensor(lengths), "rewards": rewards,
                 "prompt_index": torch.tensor(prompt_index), "texts": texts}
        write_atomically(path, lambda p: torch.save(shard, p))
        done += len(shard_jobs)
        rate = done / (time.time() - t0)
        left = len(jobs) - (s + 1) * shard_size
        log(f"rollouts: shard {s + 1}/{n_shards}, {rate:.1f} responses/s, mean reward {rewards.mean():+.3f}, "
            f"ETA {max(left, 0) / rate:.0f}s")
    return folder


class Rollouts:
    """Streams the shards of a rollout folder as padded batches (states (B, L, d), mask (B, L), rewards (B,))."""

    def __init__(self, folder):
        meta_path = os.path.join(folder, "rollouts.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{folder} has no rollouts.json; collect rollouts first (train_value.py)")
        with open(meta_path) as f:
            meta = json.load(f)
        self.paths = [os.path.join(folder, f"shard_{s:05d}.pt") for s in range(meta["n_shards"])]
        missing = [p for p in self.paths if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} rollout shards are missing (e.g. {missing[0]}); run the "
                                    "collection again to resume it")
        self.settings = meta["settings"]

    def trajectories(self, prompt_ids, rng):
        """(states (T+1, d), reward) of the responses to the given prompts, shard by shard in random order."""
        for path in rng.sample(self.paths, len(self.paths)):
            shard = torch.load(path, weights_only=True)
            pieces = shard["states"].split(shard["lengths"].tolist())
            order = [j for j in range(len(pieces)) if int(shard["prompt_index"][j]) in prompt_ids]
            rng.shuffle(order)
            for j in order:
                yield pieces[j], shard["rewards"][j]

    def reward_quantile(self, prompt_ids, q):
        """The q-quantile of the rewards of the responses to the given prompts."""
        rewards = torch.cat([shard["rewards"][[int(i) in prompt_ids for i in shard["prompt_index"]]]
                             for shard in (torch.load(p, weights_only=True) for p in self.paths)])
        return torch.quantile(rewards, q).item()

    def batches(self, prompt_ids, batch_size, seed=0):
        rng = random.Random(seed)
        pool = []
        for item in self.trajectories(set(prompt_ids), rng):
            pool.append(item)
            if len(pool) == batch_size:
                yield pad_batch(pool)
                pool = []
        if pool:
            yield pad_batch(pool)


def pad_batch(items):
    """Right-pad trajectories of different lengths into (states (B, L, d) fp32, mask (B, L), rewards (B,))."""
    L = max(s.shape[0] for s, _ in items)
    states = torch.zeros(len(items), L, items[0][0].shape[1])
    mask = torch.zeros(len(items), L, dtype=torch.bool)
    for i, (s, _) in enumerate(items):
        states[i, :s.shape[0]] = s.float()
        mask[i, :s.shape[0]] = True
    return states, mask, torch.stack([r for _, r in items]).float()


# -----------------------------------------------------------------------------
# the whole method on the embedded toy world


def main(argv=None):
    import generate as generate_script
    import toyworld
    import train_value
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy",
                        help="toy, toy-long (responses of ~100 tokens), or either with @SEED: another pretraining seed")
    parser.add_argument("--out-dir", default=None,
                        help="where rollouts, V and the generations go (default: out/<model>, next to its base model)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds of the test runs")
    parser.add_argument("--sweep", type=float, nargs="*", default=[0.0, 8.0, 16.0, 32.0, 64.0, 128.0],
                        help="settings of alpha*n (n fixed) for the reward-vs-fluency tables; none to skip")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="test responses per test prompt and seed")
    args = parser.parse_args(argv)
    name, _, seed = args.model.partition("@")
    if name not in toyworld.VARIANTS:
        parser.error(f"--model must name a toy world ({', '.join(toyworld.VARIANTS)}, optionally @SEED), got {args.model!r}")
    out_dir = args.out_dir or os.path.join(toyworld.VARIANTS[name][0], f"seed{seed}" if seed else "")

    value_path = os.path.join(out_dir, "value.pt")
    train_value.main(["--model", args.model, "--out", value_path, "--rollouts", os.path.join(out_dir, "rollouts")])
    common = ["--model", args.model, "--prompts", "toy-test", "--reward", "toy", "--value", value_path,
              "--samples-per-prompt", str(args.samples_per_prompt)]
    print("\nRE-Control on held-out test prompts, the base model beside it (mean over seeds, ± spread):")
    summaries = generate_script.main(common + ["--seeds", *map(str, args.seeds),
                                               "--out", os.path.join(out_dir, "test_generations.jsonl")])
    if args.sweep:
        sweep = common + ["--sweep", *map(str, args.sweep), "--seeds", str(args.seeds[0])]
        print("\nThe trade-off of E7 as the paper has it (no radius): a stronger ascent (alpha * n) buys reward, then "
              "falls off a cliff:")
        generate_script.main(sweep + ["--radius", "inf"])
        print("\nThe same with the calibrated radius: the edit cannot leave the neighbourhood of o_t:")
        generate_script.main(sweep)
    return summaries


if __name__ == "__main__":
    from tasks import run_cli
    run_cli(main)
