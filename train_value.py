"""
Train the value function of RE-Control: rollouts of the base model -> rewards -> Bellman training (E6), then the
strength of the control (E7) chosen on held-out validation prompts and stored with V.

- Rollouts (E1, E6, rollouts.py): the base model samples responses and records o_0 ... o_T of each; the reward
  scores them; shards on disk keep them for value training, and a long collection resumes where it stopped.
- Training (E5, E6): TD(lambda) on those trajectories; the epoch whose V best predicts the held-out returns is kept.
- Calibration (E7): the largest radius ||u|| <= radius * ||o_t|| whose cost in KL (and grammar) stays in budget.
`build_value` runs the three; the command line and recontrol.py call it.

    python train_value.py      # the embedded toy world: its base model, its training prompts, its reward
    python train_value.py --model path/to/gpt2 --prompts prompts.txt --reward sentiment --out gpt2_value.pt
    torchrun --standalone --nproc-per-node 8 train_value.py --device cuda ...   # the same job on 8 GPUs (parallel.py)
"""

import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, replace

import torch

from checkpoints import check_overwrite, write_text_atomically
from cli import add_config_arguments, checked, config_from_args, is_finite, is_whole, require, run_cli, script_parser
from control import Controller
import parallel
from generate import SamplingConfig, row_seeds, sample
from tasks import (check_prompts_fit, check_task_flags, grammar_check, load_model, load_prompts, load_reward,
                   named_tokens)
from rollouts import Rollouts, collect_rollouts, rollout_job
from value import (ValueConfig, ValueFunction, ValueReport, bellman_loss, load_value, made_by, read_made_by,
                   save_value)

DEFAULT_OUT = "out/toyworld/value.pt"  # the toy world's value, where compare.py looks for it

# -----------------------------------------------------------------------------
# settings


@dataclass
class TrainingConfig:
    """How V is trained (E6) and which epoch is kept."""
    method: str = "td"  # td: E6's TD(lambda) with stop-gradient; official: the official code's loss as written
    lam: float = 1.0  # lambda: 0 is the paper's TD(0), 1 Monte Carlo (the default: it steers, see README)
    stop_gradient: bool = True  # False: the gradient flows into the TD(lambda) targets too, as the official codes do
    gamma: float = 1.0  # discount (the paper: 1)
    epochs: int = 100
    lr: float = 1e-3  # Adam (the paper: 1e-4 or 1e-3)
    batch_size: int = 64  # trajectories per step
    state_noise: float = 0.3  # train on states moved by Gaussian noise of this size relative to ||o|| (0: none)
    held_out: float = 0.1  # fraction of prompts held out: they choose the epoch and the radius of the control
    drop_unfinished: bool = False  # train V only on responses that ended, not on those cut at max_new_tokens
    seed: int = 0  # of the split, the initialisation and the batches (rollouts use it too)

    def __post_init__(self):
        require((self.method in ("td", "official"), f"--method must be 'td' or 'official', got {self.method!r}"),
                (0 <= self.lam <= 1, f"--lam must be in [0, 1], got {self.lam}"),
                (0 < self.gamma <= 1, f"--gamma must be in (0, 1], got {self.gamma}"),
                (is_whole(self.epochs, 1), f"--epochs must be a whole number >= 1, got {self.epochs}"),
                (is_finite(self.lr, 0, strictly=True), f"--lr must be a number > 0, got {self.lr}"),
                (is_whole(self.batch_size, 1),
                 f"--train-batch-size must be a whole number >= 1, got {self.batch_size}"),
                (is_finite(self.state_noise, 0), f"--state-noise must be a number >= 0, got {self.state_noise}"),
                (0 <= self.held_out < 1, f"--held-out must be in [0, 1), got {self.held_out}"))


@dataclass
class CalibrationConfig:
    """How the strength of E7 is chosen on the held-out prompts (calibrate_control)."""
    step_size: float = 3.2  # alpha, stored with V
    n_steps: int = 20  # n, stored with V
    kl_budget: float = 0.1  # the largest mean per-token KL from the base model the control may cost
    target_quantile: float | None = None  # also stop the ascent once V reaches this quantile of the training rewards
    samples_per_prompt: int = 16  # responses per held-out prompt

    def __post_init__(self):
        require((is_finite(self.step_size, 0, strictly=True),
                 f"--step-size must be a number > 0, got {self.step_size}"),
                (is_whole(self.n_steps, 1), f"--n-steps must be a whole number >= 1, got {self.n_steps}"),
                (is_finite(self.kl_budget, 0, strictly=True), f"--kl-budget must be a number > 0, got {self.kl_budget}"),
                (self.target_quantile is None or 0 <= self.target_quantile <= 1,
                 f"--target-quantile must be in [0, 1], got {self.target_quantile}"),
                (is_whole(self.samples_per_prompt, 1),
                 f"--calibration-samples must be a whole number >= 1, got {self.samples_per_prompt}"))


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


def loss_of_part(value, states, mask, rewards, part, n_parts, method, lam, gamma, stop_gradient):
    """E6 on the rows `part` of a batch (one process's part under torchrun; all rows in one process), weighted by
    their share of the batch's terms (its real states for td, its responses for official) times n_parts: the mean of
    the n_parts processes' losses, and of their gradients (what DDP averages), is the loss of the whole batch."""
    terms = (lambda m: m.sum().item()) if method == "td" else (lambda m: m.shape[0])
    share = terms(mask[part]) / terms(mask)
    if not share:  # no row of this (short, last) batch here: the process still joins the average, with zeros
        return value(states[:1]).sum() * 0
    return bellman_loss(value, states[part], mask[part], rewards[part], method, lam, gamma, stop_gradient) * (
        share * n_parts)


def kept_epoch(history):
    """The record of the epoch whose checkpoint was kept (the last one that improved)."""
    return [h for h in history if h["kept"]][-1]


def train(rollouts, train_ids, held_out_ids, value_config, config, device=None, log=print):
    """Adam on the Bellman loss (E6). After every epoch, V is measured on the held-out responses against the
    realised return at every state (value.ValueReport), and the epoch with the smallest error is kept: the same
    yardstick for every method, since a method's own loss can fall while V stays flat. config: a TrainingConfig.
    Returns V as it was at the kept epoch (frozen, in eval mode) and the measures of every epoch; the kept one is
    the last marked "kept" (kept_epoch). Nothing is written: build_value saves V once it is complete.
    V trains on `device` (default: the CPU), in fp32."""
    if not held_out_ids:
        log("no held-out prompts: the last epoch is kept, and no step size can be calibrated")
    torch.manual_seed(config.seed)
    value = ValueFunction(value_config).to(device)
    optimizer = torch.optim.Adam(value.parameters(), lr=config.lr)
    learner = parallel.data_parallel(value)  # under torchrun: each process takes its part of every batch
    mine, world = slice(parallel.rank(), None, parallel.world_size()), parallel.world_size()  # rows of a batch
    loss_settings = (config.method, config.lam, config.gamma, config.stop_gradient)
    best, best_state, history, t0 = float("inf"), None, [], time.time()
    for epoch in range(1, config.epochs + 1):
        value.train()
        total, n = 0.0, 0
        for states, mask, rewards in rollouts.batches(train_ids, config.batch_size, config.seed * 1000 + epoch, device):
            if config.state_noise:  # V must also be right a little off the visited states, where E7 will move them
                scale = config.state_noise * states.norm(dim=-1, keepdim=True) / states.shape[-1] ** 0.5
                states = states + scale * torch.randn_like(states)  # the same noise in every process
            loss = loss_of_part(learner, states, mask, rewards, mine, world, *loss_settings)  # E6
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, n = total + loss.item() / world * len(rewards), n + len(rewards)
        total = parallel.total(total)  # the processes' shares add up to the whole batches' losses
        value.eval()
        record = {"epoch": epoch, "train_loss": total / max(n, 1),
                  **evaluate(value, rollouts.batches(held_out_ids, 256, device=device), *loss_settings)}
        score = record["error"] if held_out_ids else -epoch  # without held-out data: the latest epoch
        record["kept"] = improved = math.isfinite(record["train_loss"]) and score < best
        history.append(record)
        if improved:
            best, best_state = score, copy.deepcopy(value.state_dict())
        elapsed = time.time() - t0
        log(f"epoch {epoch:3d}/{config.epochs} | {config.method} loss {record['train_loss']:.4f} (held-out "
            f"{record['held_out_loss']:.4f}) | held-out error of V vs return {record['error']:.4f} "
            f"(constant {record['best_constant']:.4f}), corr {record['corr']:+.3f}, spread {record['spread']:.3f} | "
            f"ETA {elapsed / epoch * (config.epochs - epoch):.0f}s{' | kept' if improved else ''}")
    if best_state is None:
        raise ValueError("no epoch produced a usable value function (the losses were not finite); nothing was "
                         "written. Check --lr and --gamma")
    value.load_state_dict(best_state)
    return value.requires_grad_(False).eval(), history


# -----------------------------------------------------------------------------
# choosing the strength of the control on validation prompts (E7)

RADII = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0)  # radius * ||o|| tried by calibrate_control


def calibrate_control(model, enc, prompts, value, reward_fn, sampling, config, target=None, is_grammatical=None,
                      min_grammar_ratio=0.95, seed=0, radii=RADII, log=print):
    """Choose how far E7 may move the state, on validation prompts: the largest radius (||u|| <= radius * ||o||),
    tried smallest first, whose mean per-token KL from the base model stays within config.kl_budget (and, with a
    grammar check, whose grammatical fraction stays >= min_grammar_ratio x the base model's).
    Returns (radius or None when even the smallest breaks the budget, the curve it came from).

    The radius, not alpha, is the knob: alpha * grad V moves the state by an amount that depends on how steep this
    particular V is (and so on the machine and the seed that trained it), while the radius is a distance in the
    state's own units. The prompts must be validation prompts (never the test prompts): this is a choice of a
    hyper-parameter. The sweep stops at the first radius over budget, so a noisy pass further on is never taken.
    """
    jobs = [enc.encode(p, allowed_special="all") for p in prompts for _ in range(config.samples_per_prompt)]
    job_prompts = [p for p in prompts for _ in range(config.samples_per_prompt)]

    def measure(edit):
        def run(start, end):  # one batch; under torchrun each process runs every N-th one
            out = sample(model, jobs[start:end], sampling, tokenizer=enc, seed=row_seeds(seed, start, end - start),
                         edit=edit, record_kl=True)
            return out.texts, out.kl, reward_fn(job_prompts[start:end], out.texts).float().tolist()

        batches = parallel.map_batches(len(jobs), sampling.batch_size, run)
        texts, kls, rewards = ([x for batch in batches for x in batch[k]] for k in range(3))
        point = {"kl": sum(kls) / len(kls), "reward": sum(rewards) / len(rewards)}
        if is_grammatical is not None:
            point["grammatical"] = sum(map(is_grammatical, texts)) / len(texts)
        return point

    base = measure(None)
    curve, chosen = [{"radius": 0, **base, "ok": True}], None
    for radius in radii:
        point = measure(Controller(value, config.step_size, config.n_steps, radius=radius, target=target))
        point["ok"] = point["kl"] <= config.kl_budget and (
            is_grammatical is None or point["grammatical"] >= min_grammar_ratio * base["grammatical"])
        curve.append({"radius": radius, **point})
        grammar = f", grammatical {point['grammatical']:.1%}" if is_grammatical else ""
        log(f"calibration: radius {radius:<4g} | reward {point['reward']:+.3f} (base {base['reward']:+.3f}) | "
            f"KL/token {point['kl']:.3f}{grammar} | {'within budget' if point['ok'] else 'over budget: stop'}")
        if not point["ok"]:
            break
        chosen = radius
    return chosen, curve


# -----------------------------------------------------------------------------
# the whole job: rollouts -> V -> the strength of its control


def build_value(model, enc, prompts, reward_name, out, rollouts_folder, sampling, value_config, training,
                calibration, model_id, overwrite=False, shard_size=512, log=print):
    """Collect rollouts of `model` on `prompts` scored by the reward `reward_name` (into rollouts_folder), train V
    on them (TrainingConfig), calibrate its control on the held-out prompts (CalibrationConfig), and save it all to
    `out` (once, at the end; with the measures of every epoch beside it). sampling: a SamplingConfig with
    max_new_tokens set. An `out` or a rollout folder made by another job is replaced only with `overwrite`.
    Returns (V, the checkpoint dict, the history)."""
    device = model.wte.weight.device
    reward_fn = load_reward(reward_name, device=device)
    job = rollout_job(model, enc, prompts, reward_name, model_id)
    train_args = {**job, "rollouts": rollouts_folder, "sampling": asdict(sampling), "value": asdict(value_config),
                  "training": asdict(training), "calibration": asdict(calibration)}
    check_overwrite(out, made_by(model_id, model, reward_name, train_args), read_made_by, overwrite)
    collect_rollouts(model, enc, prompts, reward_fn, rollouts_folder, sampling, seed=training.seed,
                     shard_size=shard_size, made_by=job, overwrite=overwrite, log=log)
    ids = list(range(len(prompts)))
    random.Random(training.seed).shuffle(ids)
    n_held = round(len(ids) * training.held_out)
    held_out_ids, train_ids = ids[:n_held], ids[n_held:]
    name = "the official loss" if training.method == "official" else (
        f"TD(lambda = {training.lam:g}){'' if training.stop_gradient else ' without stop-gradient'}")
    log(f"training V on {len(train_ids)} prompts, {len(held_out_ids)} held out ({name}, gamma {training.gamma})")
    rollouts = Rollouts(rollouts_folder, training.drop_unfinished)
    ended, total = rollouts.finished_fraction()
    if ended < total:
        log(f"rollouts: {total - ended} of {total} responses ({(total - ended) / total:.0%}) were cut at "
            f"{sampling.max_new_tokens} tokens before they ended; R scores them as they are. "
            + ("They are left out of training (--drop-unfinished)." if training.drop_unfinished else
               "--drop-unfinished trains V without them; --max-new-tokens lets them finish."))
    if training.drop_unfinished and ended == 0:
        raise ValueError("every response was cut at --max-new-tokens, so --drop-unfinished leaves nothing to train "
                         "on; raise --max-new-tokens")
    value, history = train(rollouts, train_ids, held_out_ids, value_config, training, device, log=log)
    best = kept_epoch(history)
    log(f"kept epoch {best['epoch']}: held-out error {best['error']:.4f} against {best['best_constant']:.4f} "
        f"for the best constant, correlation with the return {best['corr']:+.3f}")
    control = {}
    if held_out_ids:
        target = None
        if calibration.target_quantile is not None:
            target = rollouts.reward_quantile(train_ids, calibration.target_quantile)
        log(f"choosing how far the control may move the state, on the {len(held_out_ids)} held-out prompts (alpha "
            f"{calibration.step_size:g}, n {calibration.n_steps}, target V "
            f"{'none' if target is None else f'{target:+.3f}'}, KL budget {calibration.kl_budget}/token)")
        radius, curve = calibrate_control(
            model, enc, [prompts[i] for i in held_out_ids], value, reward_fn, sampling,
            calibration, target=target, is_grammatical=grammar_check(reward_name), seed=training.seed + 1, log=log)
        control = {"step_size": calibration.step_size if radius else 0.0, "n_steps": calibration.n_steps,
                   "radius": radius, "target": target, "kl_budget": calibration.kl_budget, "curve": curve}
        if radius is None:
            log("even the smallest radius costs more than the KL budget: the control is off by default")
        else:
            log(f"radius {radius:g}, stored with V; generate.py uses it unless given --radius")
    if parallel.is_main():  # under torchrun, rank 0 writes what every process computed
        save_value(out, value.cpu(), model_id, model, reward_name, train_args, metrics=best, control=control)
        write_text_atomically(history_path(out), json.dumps(history))
    parallel.barrier()  # the checkpoint is on disk before any process reads it
    _, checkpoint = load_value(out)
    log(f"value checkpoint: {out}")
    return value.to(device), checkpoint, history


TRAINING_HELP = {
    "method": "td: E6's TD(lambda) with stop-gradient; official: the official code's loss as written",
    "lam": "lambda of TD(lambda): 0 the paper's TD(0), 1 Monte Carlo (the default: it steers, see README)",
    "stop_gradient": "hold the TD(lambda) targets fixed (--no-stop-gradient: the gradient flows into them too, as "
                     "the official codes do)",
    "gamma": "discount of E6 (the paper: 1)",
    "epochs": "passes over the training rollouts",
    "lr": "Adam learning rate (paper: 1e-4 or 1e-3)",
    "batch_size": "trajectories per training step",
    "state_noise": "train V on states moved by Gaussian noise of this size relative to ||o|| (0: none)",
    "held_out": "fraction of prompts held out: they choose the epoch and the radius of the control",
    "drop_unfinished": "train V only on responses that ended (EOS or a stop string), not on those cut at "
                       "--max-new-tokens",
    "seed": "seed of sampling, the split and training"}
TRAINING_FLAGS = {"batch_size": "train-batch-size"}
CALIBRATION_HELP = {
    "step_size": "alpha of E7 stored with V (calibration uses it)",
    "n_steps": "n of E7 stored with V (calibration uses it)",
    "kl_budget": "calibration: the largest mean per-token KL from the base model the control may cost",
    "target_quantile": "also stop the ascent once V reaches this quantile of the training rewards (e.g. 0.9; "
                       "default: no target)",
    "samples_per_prompt": "responses per held-out prompt in the calibration"}
CALIBRATION_FLAGS = {"samples_per_prompt": "calibration-samples"}


def main(argv=None):
    parser = script_parser(__doc__, prompts="toy-train", sampling=SamplingConfig(samples_per_prompt=48))
    parser.add_argument("--out", default=DEFAULT_OUT, help="the value checkpoint to write")
    parser.add_argument("--rollouts", default=None, help="folder for the rollout shards (default: next to --out)")
    add_config_arguments(parser, TrainingConfig(), TRAINING_HELP, TRAINING_FLAGS)
    add_config_arguments(parser, CalibrationConfig(), CALIBRATION_HELP, CALIBRATION_FLAGS)
    parser.add_argument("--hidden-layers", type=int, default=2, help="hidden layers of V")
    parser.add_argument("--width", type=int, default=0, help="hidden width of V (0: the model's width d)")
    parser.add_argument("--activation", default="relu", help="relu, gelu, tanh or silu")
    parser.add_argument("--shard-size", type=int, default=512,
                        help="responses per rollout shard: an interrupted collection resumes at its first missing "
                             "shard; under torchrun the processes take the shards in turn")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an --out checkpoint or --rollouts shards that another job made")
    args = parser.parse_args(argv)

    def settings():  # every flag is checked before any work
        require((is_whole(args.shard_size, 1), f"--shard-size must be a whole number >= 1, got {args.shard_size}"))
        check_task_flags(args)
        check_overwrite(args.out, None, read_made_by, args.overwrite)
        ValueConfig(n_embd=1, n_hidden=args.hidden_layers, width=args.width, activation=args.activation)
        return (config_from_args(TrainingConfig, args, TRAINING_FLAGS),
                config_from_args(CalibrationConfig, args, CALIBRATION_FLAGS), SamplingConfig.from_args(args))

    training, calibration, sampling = checked(parser, settings)
    args.device = parallel.start(args.device)  # under torchrun: join the other processes
    prompts = load_prompts(args.prompts, args.chat)
    model, enc = load_model(args.model, dtype=args.dtype, device=args.device)
    sampling = replace(sampling, max_new_tokens=check_prompts_fit(model, enc, prompts, sampling.max_new_tokens),
                       eos_ids=named_tokens(enc, args.eos) if args.eos else None)
    value_config = ValueConfig(n_embd=model.config.n_embd, n_hidden=args.hidden_layers, width=args.width,
                               activation=args.activation)
    rollouts = args.rollouts or os.path.splitext(args.out)[0] + "_rollouts"
    _, _, history = build_value(model, enc, prompts, args.reward, args.out, rollouts, sampling, value_config, training,
                                calibration, args.model, overwrite=args.overwrite, shard_size=args.shard_size)
    return history


INTERRUPTED = "interrupted; rerun the same command to resume: the rollout shards written so far are kept"

if __name__ == "__main__":
    run_cli(main, INTERRUPTED)
