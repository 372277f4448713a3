"""
RE-Control (Kong et al., NeurIPS 2024): align a language model at test time by editing its representation.

- Controller (PAPER.md E7): at every decoding step, gradient ascent on the value V_phi(o_t + u) moves the
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
    """E7: u <- u + alpha * grad_u [V(o + u) - l2 * ||u||^2], n steps from u = 0; returns o + u.

    Works on the newest state only, (B, C); batched (each row gets its own u, since V is applied row-wise and
    the rows' objectives are summed); in fp32 whatever the model's dtype; the value network stays frozen.
    """

    def __init__(self, value, step_size=0.5, n_steps=30, l2=0.0, max_norm=None):
        if step_size < 0 or n_steps < 0 or l2 < 0:
            raise ValueError(f"the control needs step size >= 0, steps >= 0 and l2 >= 0; got step size "
                             f"{step_size}, {n_steps} steps, l2 {l2}")
        if int(n_steps) != n_steps:
            raise ValueError(f"the number of control steps must be a whole number, got {n_steps}")
        if max_norm is not None and max_norm <= 0:
            raise ValueError(f"max_norm must be > 0 (or None for no limit), got {max_norm}")
        self.value, self.step_size, self.n_steps, self.l2, self.max_norm = value, step_size, int(n_steps), l2, max_norm

    def control(self, o):
        """u (B, C) for states o (B, C)."""
        o = o.detach().float()
        u = torch.zeros_like(o)
        with torch.enable_grad():  # generation runs under no_grad; the inner loop needs gradients for u only
            for _ in range(self.n_steps):
                u.requires_grad_(True)
                objective = self.value(o + u).sum() - self.l2 * (u ** 2).sum()  # E4's trade-off, per row
                (grad,) = torch.autograd.grad(objective, u)
                u = (u + self.step_size * grad).detach()
                if self.max_norm is not None:  # optional projection onto the ball ||u|| <= max_norm
                    u = u * (self.max_norm / u.norm(dim=-1, keepdim=True).clamp(min=self.max_norm))
        return u

    def __call__(self, o):
        if self.n_steps == 0 or self.step_size == 0:
            return o  # exactly the base model
        return (o.float() + self.control(o)).to(o.dtype)  # E3: the head reads o_t + u_t


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

# Settings for the toy world, chosen with the sweep in README.md. Monte-Carlo targets: on this little data the
# TD(0) value stays nearly flat (its only signal, at the last state, is diluted among ~15 bootstrapped ones).
TOY_STEP_SIZE, TOY_N_STEPS = 1.0, 20
TOY_TRAIN_ARGS = ["--samples-per-prompt", "48", "--max-new-tokens", "32", "--epochs", "100", "--lr", "1e-3",
                  "--method", "mc"]


def train_toy_value(value_path, rollouts):
    """Rollouts of the toy world's base model on its training prompts, then V, with the settings above."""
    import train_value
    return train_value.main(["--model", "toy", "--prompts", "toy-train", "--reward", "toy", "--out", value_path,
                             "--rollouts", rollouts] + TOY_TRAIN_ARGS)


def main(argv=None):
    import generate as generate_script
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="out/toyworld",
                        help="where rollouts, V and the generations go (the base model is cached in out/toyworld)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds of the test runs")
    parser.add_argument("--step-size", type=float, default=TOY_STEP_SIZE, help="alpha of E7 for the main table")
    parser.add_argument("--n-steps", type=int, default=TOY_N_STEPS, help="n of E7 for the main table")
    parser.add_argument("--sweep", type=float, nargs="*", default=[0.0, 5.0, 10.0, 20.0, 40.0, 80.0],
                        help="settings of alpha*n (n fixed) for the reward-vs-fluency table; none to skip")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="test responses per test prompt and seed")
    args = parser.parse_args(argv)

    value_path = os.path.join(args.out_dir, "value.pt")
    train_toy_value(value_path, os.path.join(args.out_dir, "rollouts"))
    common = ["--model", "toy", "--prompts", "toy-test", "--reward", "toy", "--value", value_path,
              "--samples-per-prompt", str(args.samples_per_prompt), "--max-new-tokens", "32"]
    print("\nRE-Control on held-out test prompts, the base model beside it (mean over seeds, ± spread):")
    generate_script.main(common + ["--step-size", str(args.step_size), "--n-steps", str(args.n_steps),
                                   "--seeds", *map(str, args.seeds),
                                   "--out", os.path.join(args.out_dir, "test_generations.jsonl")])
    if args.sweep:
        print(f"\nThe trade-off of E7: stronger control (alpha * n, n = {args.n_steps}) buys reward, then costs "
              "grammar:")
        generate_script.main(common + ["--n-steps", str(args.n_steps), "--sweep", *map(str, args.sweep),
                                       "--seeds", str(args.seeds[0])])


if __name__ == "__main__":
    from tasks import run_cli
    run_cli(main)
