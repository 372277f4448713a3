"""
Train the value function of RE-Control: rollouts from the base model -> rewards -> Bellman training (E6).

    python train_value.py --model toy --prompts toy-train --reward toy --out out/toyworld/value.pt
    python train_value.py --model path/to/gpt2 --prompts prompts.txt --reward sentiment --out gpt2_value.pt
"""

import argparse
import json
import os
import random
import time

import torch

from recontrol import Rollouts, collect_rollouts
from tasks import (add_sampling_arguments, add_task_arguments, check_prompts_fit, load_model, load_prompts,
                   load_reward, run_cli)
from model import write_text_atomically
from value import ValueConfig, ValueFunction, bellman_loss, save_value


def history_path(value_path):
    """Where the per-epoch losses of a value checkpoint are kept (for plots)."""
    return os.path.splitext(value_path)[0] + "_history.json"


@torch.no_grad()
def evaluate(value, batches, method, gamma):
    """Held-out Bellman loss, and the calibration of V(o_0) against the realised reward (correlation)."""
    losses, weights, v0, rewards = [], [], [], []
    for states, mask, r in batches:
        losses.append(bellman_loss(value, states, mask, r, method, gamma).item())
        weights.append(mask.sum().item())
        v0.append(value(states[:, 0]))
        rewards.append(r)
    if not losses:
        return float("nan"), float("nan")
    v0, rewards = torch.cat(v0), torch.cat(rewards)
    corr = torch.corrcoef(torch.stack([v0, rewards]))[0, 1].item() if len(v0) > 1 else float("nan")
    return sum(l * w for l, w in zip(losses, weights)) / sum(weights), corr


def train(rollouts, train_ids, held_out_ids, value_config, out, checkpoint_info, method="td", gamma=1.0,
          epochs=30, lr=1e-3, batch_size=64, seed=0, log=print):
    """Adam on the Bellman loss; after every epoch the held-out loss; the best checkpoint is kept (atomically),
    and the losses of every epoch are written next to it."""
    torch.manual_seed(seed)
    value = ValueFunction(value_config)
    optimizer = torch.optim.Adam(value.parameters(), lr=lr)
    best, history, t0 = float("inf"), [], time.time()
    for epoch in range(1, epochs + 1):
        value.train()
        total, n = 0.0, 0
        for states, mask, rewards in rollouts.batches(train_ids, batch_size, seed=seed * 1000 + epoch):
            loss = bellman_loss(value, states, mask, rewards, method, gamma)  # E6
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, n = total + loss.item() * len(rewards), n + len(rewards)
        value.eval()
        held_loss, corr = evaluate(value, rollouts.batches(held_out_ids, 256), method, gamma)
        history.append({"epoch": epoch, "train_loss": total / max(n, 1), "held_out_loss": held_loss,
                        "calibration": corr})
        write_text_atomically(history_path(out), json.dumps(history))
        improved = held_loss < best or not held_out_ids
        if improved:
            best = held_loss
            save_value(out, value, metrics=history[-1], **checkpoint_info)
        elapsed = time.time() - t0
        log(f"epoch {epoch:3d}/{epochs} | train loss {total / max(n, 1):.4f} | held-out loss {held_loss:.4f} | "
            f"corr(V(o_0), R) {corr:+.3f} | {n / elapsed * epoch:.0f} traj/s | "
            f"ETA {elapsed / epoch * (epochs - epoch):.0f}s{' | saved' if improved else ''}")
    return history


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_arguments(parser, prompts="toy-train")
    add_sampling_arguments(parser)
    parser.set_defaults(samples_per_prompt=4)
    parser.add_argument("--out", default="out/toyworld/value.pt", help="the value checkpoint to write")
    parser.add_argument("--rollouts", default=None, help="folder for the rollout shards (default: next to --out)")
    parser.add_argument("--method", choices=["td", "mc"], default="td", help="TD(0) Bellman targets or Monte Carlo")
    parser.add_argument("--gamma", type=float, default=1.0, help="discount of E6 (the paper: 1)")
    parser.add_argument("--epochs", type=int, default=30, help="passes over the training rollouts")
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (paper: 1e-4 or 1e-3)")
    parser.add_argument("--train-batch-size", type=int, default=64, help="trajectories per training step")
    parser.add_argument("--hidden-layers", type=int, default=2, help="hidden layers of V")
    parser.add_argument("--width", type=int, default=0, help="hidden width of V (0: the model's width d)")
    parser.add_argument("--activation", default="relu", help="relu, gelu, tanh or silu")
    parser.add_argument("--held-out", type=float, default=0.1, help="fraction of prompts held out for validation")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling, the split and training")
    args = parser.parse_args(argv)
    if not 0 <= args.held_out < 1:
        parser.error(f"--held-out must be in [0, 1), got {args.held_out}")

    reward_fn = load_reward(args.reward, device=args.device)
    prompts = load_prompts(args.prompts)
    model, enc = load_model(args.model, dtype=args.dtype, device=args.device)
    check_prompts_fit(model, enc, prompts, args.max_new_tokens)
    folder = args.rollouts or os.path.splitext(args.out)[0] + "_rollouts"
    print(f"collecting {args.samples_per_prompt} responses for each of {len(prompts)} prompts into {folder}")
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
    print(f"training V on {len(train_ids)} prompts, {len(held_out_ids)} held out ({args.method}, gamma {args.gamma})")
    history = train(Rollouts(folder), train_ids, held_out_ids, value_config, args.out, info, method=args.method,
                    gamma=args.gamma, epochs=args.epochs, lr=args.lr, batch_size=args.train_batch_size, seed=args.seed)
    print(f"best checkpoint: {args.out}")
    return history


if __name__ == "__main__":
    run_cli(main)
