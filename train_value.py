"""
Train the value function of RE-Control: rollouts from the base model -> rewards -> Bellman training (E6),
then the strength of the control (E7) chosen on held-out validation prompts and stored with V.

- Rollouts (E1, E6): the base model samples responses and records o_0 ... o_T of each; the reward scores them;
  shards on disk keep them (fp16) for value training, and a long collection resumes where it stopped.

    python train_value.py      # the embedded toy world: its base model, its training prompts, its reward
    python train_value.py --model path/to/gpt2 --prompts prompts.txt --reward sentiment --out gpt2_value.pt
"""

import argparse
import json
import math
import os
import random
import time

import torch

import toyworld
from control import calibrate_control
from tasks import (add_sampling_arguments, add_task_arguments, check_prompts_fit, load_model, load_prompts,
                   load_reward, run_cli)
from model import generate, write_atomically, write_text_atomically
from value import ValueConfig, ValueFunction, ValueReport, bellman_loss, load_value, save_value


# -----------------------------------------------------------------------------
# rollouts: states of the base model's own responses, with their rewards (E1, E6)


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
# value training (E6)


def history_path(value_path):
    """Where the per-epoch losses of a value checkpoint are kept (for plots)."""
    return os.path.splitext(value_path)[0] + "_history.json"


@torch.no_grad()
def evaluate(value, batches, method, lam, gamma, stop_gradient=True):
    """One pass over the held-out responses: value.ValueReport's measures against the realised return, and the
    training method's own loss (weighted by states; printed, never used to choose)."""
    report, total, weight = ValueReport(gamma), 0.0, 0
    for states, mask, rewards in batches:
        report.add(value, states, mask, rewards)
        total += bellman_loss(value, states, mask, rewards, method, lam, gamma, stop_gradient).item() * mask.sum().item()
        weight += mask.sum().item()
    return {"held_out_loss": total / weight if weight else float("nan"), **report.summary()}


def kept_epoch(history):
    """The record of the epoch whose checkpoint was kept (the last one that improved)."""
    return [h for h in history if h["kept"]][-1]


def train(rollouts, train_ids, held_out_ids, value_config, out, checkpoint_info, method="td", lam=1.0, gamma=1.0,
          epochs=30, lr=1e-3, batch_size=64, state_noise=0.0, stop_gradient=True, seed=0, log=print):
    """Adam on the Bellman loss (E6). After every epoch, V is measured on the held-out responses against the
    realised return at every state (value.ValueReport), and the epoch with the smallest error is kept
    (atomically): the same yardstick for every method, since a method's own loss can fall while V stays flat.
    The measures of every epoch are written next to the checkpoint. Returns the history; the kept epoch is the
    last one marked "kept" (kept_epoch)."""
    if not held_out_ids:
        log("no held-out prompts: the last epoch is kept, and no step size can be calibrated")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.manual_seed(seed)
    value = ValueFunction(value_config)
    optimizer = torch.optim.Adam(value.parameters(), lr=lr)
    best, history, t0 = float("inf"), [], time.time()
    for epoch in range(1, epochs + 1):
        value.train()
        total, n = 0.0, 0
        for states, mask, rewards in rollouts.batches(train_ids, batch_size, seed=seed * 1000 + epoch):
            if state_noise:  # V must also be right a little off the visited states, where E7 will move them
                scale = state_noise * states.norm(dim=-1, keepdim=True) / states.shape[-1] ** 0.5
                states = states + scale * torch.randn_like(states)
            loss = bellman_loss(value, states, mask, rewards, method, lam, gamma, stop_gradient)  # E6
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, n = total + loss.item() * len(rewards), n + len(rewards)
        value.eval()
        record = {"epoch": epoch, "train_loss": total / max(n, 1),
                  **evaluate(value, rollouts.batches(held_out_ids, 256), method, lam, gamma, stop_gradient)}
        score = record["error"] if held_out_ids else -epoch  # without held-out data: the latest epoch
        record["kept"] = improved = math.isfinite(record["train_loss"]) and score < best
        history.append(record)
        write_text_atomically(history_path(out), json.dumps(history))
        if improved:
            best = score
            save_value(out, value, metrics=record, **checkpoint_info)
        elapsed = time.time() - t0
        log(f"epoch {epoch:3d}/{epochs} | {method} loss {record['train_loss']:.4f} (held-out "
            f"{record['held_out_loss']:.4f}) | held-out error of V vs return {record['error']:.4f} "
            f"(constant {record['best_constant']:.4f}), corr {record['corr']:+.3f}, spread {record['spread']:.3f} | "
            f"ETA {elapsed / epoch * (epochs - epoch):.0f}s{' | kept' if improved else ''}")
    if best == float("inf"):
        raise ValueError(f"no epoch produced a usable value function (losses were not finite); {out} was not "
                         "written. Check the rewards for NaN, and --lr / --gamma")
    return history


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_arguments(parser, prompts="toy-train")
    add_sampling_arguments(parser, max_new_tokens=None)
    parser.set_defaults(samples_per_prompt=48)
    parser.add_argument("--out", default="out/toyworld/value.pt", help="the value checkpoint to write")
    parser.add_argument("--rollouts", default=None, help="folder for the rollout shards (default: next to --out)")
    parser.add_argument("--method", choices=["td", "official"], default="td",
                        help="td: E6's TD(lambda) with stop-gradient; official: the official code's loss as written")
    parser.add_argument("--lam", type=float, default=1.0,
                        help="lambda of TD(lambda): 0 the paper's TD(0), 1 Monte Carlo (the default: it steers, "
                             "see README)")
    parser.add_argument("--no-stop-gradient", dest="stop_gradient", action="store_false",
                        help="let the gradient flow into the TD(lambda) targets too, as the official codes do")
    parser.add_argument("--gamma", type=float, default=1.0, help="discount of E6 (the paper: 1)")
    parser.add_argument("--epochs", type=int, default=100, help="passes over the training rollouts")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (paper: 1e-4 or 1e-3)")
    parser.add_argument("--train-batch-size", type=int, default=64, help="trajectories per training step")
    parser.add_argument("--hidden-layers", type=int, default=2, help="hidden layers of V")
    parser.add_argument("--width", type=int, default=0, help="hidden width of V (0: the model's width d)")
    parser.add_argument("--activation", default="relu", help="relu, gelu, tanh or silu")
    parser.add_argument("--state-noise", type=float, default=0.3,
                        help="train V on states moved by Gaussian noise of this size relative to ||o|| (0: none)")
    parser.add_argument("--held-out", type=float, default=0.1,
                        help="fraction of prompts held out: they choose the epoch and the radius of the control")
    parser.add_argument("--step-size", type=float, default=3.2, help="alpha of E7 stored with V (calibration uses it)")
    parser.add_argument("--n-steps", type=int, default=20, help="n of E7 stored with V (calibration uses it)")
    parser.add_argument("--kl-budget", type=float, default=0.1,
                        help="calibration: the largest mean per-token KL from the base model the control may cost")
    parser.add_argument("--target-quantile", type=float, default=None,
                        help="also stop the ascent once V reaches this quantile of the training rewards (e.g. 0.9; "
                             "default: no target)")
    parser.add_argument("--calibration-samples", type=int, default=16, help="responses per held-out prompt")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling, the split and training")
    args = parser.parse_args(argv)
    if not 0 <= args.held_out < 1:
        parser.error(f"--held-out must be in [0, 1), got {args.held_out}")
    if not 0 <= args.lam <= 1:
        parser.error(f"--lam must be in [0, 1], got {args.lam}")
    if not 0 < args.gamma <= 1:
        parser.error(f"--gamma must be in (0, 1], got {args.gamma}")
    if not (args.kl_budget > 0 and args.n_steps > 0 and args.step_size > 0):
        parser.error("--kl-budget, --step-size and --n-steps must be > 0")
    if args.target_quantile is not None and not 0 <= args.target_quantile <= 1:
        parser.error(f"--target-quantile must be in [0, 1], got {args.target_quantile}")

    reward_fn = load_reward(args.reward, device=args.device)
    prompts = load_prompts(args.prompts)
    model, enc = load_model(args.model, dtype=args.dtype, device=args.device)
    args.max_new_tokens = check_prompts_fit(model, enc, prompts, args.max_new_tokens)
    folder = args.rollouts or os.path.splitext(args.out)[0] + "_rollouts"
    print(f"rollouts: {args.samples_per_prompt} responses for each of {len(prompts)} prompts in {folder}")
    collect_rollouts(model, enc, prompts, reward_fn, folder, samples_per_prompt=args.samples_per_prompt,
                     batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_strings=args.stop,
                     seed=args.seed)
    ids = list(range(len(prompts)))
    random.Random(args.seed).shuffle(ids)
    n_held = round(len(ids) * args.held_out)
    held_out_ids, train_ids = ids[:n_held], ids[n_held:]
    value_config = ValueConfig(n_embd=model.config.n_embd, n_hidden=args.hidden_layers, width=args.width,
                               activation=args.activation)
    info = dict(base_model_id=args.model, model=model, reward_name=args.reward, train_args=vars(args))
    name = "the official loss" if args.method == "official" else (
        f"TD(lambda = {args.lam:g}){'' if args.stop_gradient else ' without stop-gradient'}")
    print(f"training V on {len(train_ids)} prompts, {len(held_out_ids)} held out ({name}, gamma {args.gamma})")
    rollouts = Rollouts(folder)
    history = train(rollouts, train_ids, held_out_ids, value_config, args.out, info, method=args.method,
                    lam=args.lam, gamma=args.gamma, epochs=args.epochs, lr=args.lr,
                    batch_size=args.train_batch_size, state_noise=args.state_noise,
                    stop_gradient=args.stop_gradient, seed=args.seed)
    best = kept_epoch(history)
    print(f"kept epoch {best['epoch']}: held-out error {best['error']:.4f} against {best['best_constant']:.4f} "
          f"for the best constant, correlation with the return {best['corr']:+.3f}")
    if held_out_ids:
        target = None
        if args.target_quantile is not None:
            target = rollouts.reward_quantile(train_ids, args.target_quantile)
        value, _ = load_value(args.out, model, args.model)
        print(f"choosing how far the control may move the state, on the {len(held_out_ids)} held-out prompts "
              f"(alpha {args.step_size:g}, n {args.n_steps}, target V {'none' if target is None else f'{target:+.3f}'}"
              f", KL budget {args.kl_budget}/token)")
        radius, curve = calibrate_control(
            model, enc, [prompts[i] for i in held_out_ids], value.to(model.wte.weight.device), reward_fn,
            step_size=args.step_size, n_steps=args.n_steps, target=target, kl_budget=args.kl_budget,
            is_grammatical=toyworld.is_grammatical if args.reward == "toy" else None,
            samples_per_prompt=args.calibration_samples, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            stop_strings=args.stop, seed=args.seed + 1)
        control = {"step_size": args.step_size if radius else 0.0, "n_steps": args.n_steps, "radius": radius,
                   "target": target, "kl_budget": args.kl_budget, "curve": curve}
        checkpoint = torch.load(args.out, weights_only=True)
        save_value(args.out, value, metrics=checkpoint["metrics"], control=control, **info)
        if radius is None:
            print(f"even the smallest radius costs more than the KL budget: the control is off by default in {args.out}")
        else:
            print(f"radius {radius:g} stored in {args.out}; generate.py uses it unless given --radius")
    print(f"value checkpoint: {args.out}")
    return history


if __name__ == "__main__":
    run_cli(main)
