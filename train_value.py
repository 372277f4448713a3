"""
Train the value function of RE-Control: rollouts of the base model -> rewards -> Bellman training
(E6), then the strength of the control (E7) chosen on held-out validation prompts and stored with V.

- Rollouts (E1, E6, rollouts.py): the base model samples responses and records o_0 ... o_T of
  each; the reward scores them; shards on disk keep them for value training, and a long collection
  resumes where it stopped.
- Training (E5, E6): TD(lambda) on those trajectories; the epoch whose V best predicts the
  held-out returns is kept.
- Calibration (E7): the largest radius ||u|| <= radius * ||o_t|| whose cost in KL (and grammar)
  stays in budget.
`build_value` runs the three; the command line and recontrol.py call it.

    python train_value.py      # the toy world: its base model, its training prompts, its reward
    python train_value.py --model path/to/gpt2 --prompts prompts.txt --reward sentiment --out v.pt
    torchrun --standalone --nproc-per-node 8 train_value.py --device cuda ...   # on 8 GPUs
"""

import copy
import json
import math
import os
import random
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass

import torch

import worlds
from control import ControlConfig, Controller
from generate import SamplingConfig, sample_many, sampling_from_args, script_parser
from plumbing import parallel
from plumbing.checkpoints import (check_dtype_and_device, load_value, read_value_provenance,
                                  save_value, value_provenance)
from plumbing.cli import (add_config_arguments, checked, config_from_args, is_finite, is_whole,
                          require, run_cli, setting)
from plumbing.files import (Lock, check_overwrite, check_writable, remove_leftovers,
                            write_text_atomically)
from rollouts import Rollouts, collect_rollouts, rollout_job
from value import ValueConfig, ValueFunction, ValueReport, bellman_loss

DEFAULT_OUT = "out/toyworld/value.pt"  # the toy world's value, where compare.py looks for it

# -----------------------------------------------------------------------------
# settings


@dataclass
class TrainingConfig:
    """How V is trained (E6) and which epoch is kept."""
    method: str = setting("td", "td: E6's TD(lambda) with stop-gradient; official: the official "
                          "code's loss as written")
    lam: float = setting(1.0, "lambda of TD(lambda): 0 the paper's TD(0), 1 Monte Carlo (the "
                         "default: it steers, see docs/results.md)")
    stop_gradient: bool = setting(True, "hold the TD(lambda) targets fixed (--no-stop-gradient: "
                                  "the gradient flows into them too, as the official codes do)")
    gamma: float = setting(1.0, "discount of E6 (the paper: 1)")
    epochs: int = setting(100, "passes over the training rollouts")
    lr: float = setting(1e-3, "Adam learning rate (the paper: 1e-4 or 1e-3)")
    batch_size: int = setting(64, "trajectories per training step", flag="train-batch-size")
    state_noise: float = setting(0.3, "train V on states moved by Gaussian noise of this size "
                                 "relative to ||o|| (0: none)")
    held_out: float = setting(0.1, "fraction of prompts held out: they choose the epoch and the "
                              "radius of the control")
    drop_unfinished: bool = setting(False, "train V only on responses that ended (EOS or a stop "
                                    "string), not on those cut at --max-new-tokens")
    seed: int = setting(0, "seed of the rollouts, the split and training")

    def __post_init__(self):
        require((self.method in ("td", "official"),
                 f"method must be 'td' or 'official', got {self.method!r}"),
                (0 <= self.lam <= 1, f"lam must be in [0, 1], got {self.lam}"),
                (0 < self.gamma <= 1, f"gamma must be in (0, 1], got {self.gamma}"),
                (is_whole(self.epochs, 1),
                 f"epochs must be a whole number >= 1, got {self.epochs}"),
                (is_finite(self.lr, 0, strictly=True), f"lr must be a number > 0, got {self.lr}"),
                (is_whole(self.batch_size, 1),
                 f"batch_size must be a whole number >= 1, got {self.batch_size}"),
                (is_finite(self.state_noise, 0),
                 f"state_noise must be a number >= 0, got {self.state_noise}"),
                (0 <= self.held_out < 1, f"held_out must be in [0, 1), got {self.held_out}"))


# radius * ||o|| tried by calibrate_control
RADII = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0)


@dataclass
class CalibrationConfig:
    """How the strength of E7 is chosen on the held-out prompts (calibrate_control)."""
    step_size: float = setting(3.2, "alpha of E7 stored with V (calibration uses it)")
    n_steps: int = setting(20, "n of E7 stored with V (calibration uses it)")
    kl_budget: float = setting(0.1, "calibration: the largest mean per-token KL from the base "
                               "model the control may cost")
    target_quantile: float | None = setting(None, "also stop the ascent once V reaches this "
                                            "quantile of the training rewards (e.g. 0.9; "
                                            "default: no target)")
    samples_per_prompt: int = setting(16, "responses per held-out prompt in the calibration",
                                      flag="calibration-samples")
    # with a grammar check: the least grammatical fraction, x the base model's
    min_grammar_ratio: float = 0.95
    radii: tuple = RADII  # the radii tried, smallest first

    def __post_init__(self):
        require((is_finite(self.step_size, 0, strictly=True),
                 f"step_size must be a number > 0, got {self.step_size}"),
                (is_whole(self.n_steps, 1),
                 f"n_steps must be a whole number >= 1, got {self.n_steps}"),
                (is_finite(self.kl_budget, 0, strictly=True),
                 f"kl_budget must be a number > 0, got {self.kl_budget}"),
                (self.target_quantile is None or 0 <= self.target_quantile <= 1,
                 f"target_quantile must be in [0, 1], got {self.target_quantile}"),
                (is_whole(self.samples_per_prompt, 1),
                 f"samples_per_prompt must be a whole number >= 1, got {self.samples_per_prompt}"))
        self.radii = tuple(self.radii)


# -----------------------------------------------------------------------------
# value training (E6)


def history_path(value_path):
    """Where the per-epoch losses of a value checkpoint are kept (for plots), with what made them.
    """
    return os.path.splitext(value_path)[0] + "_history.json"


def read_history_provenance(path):
    """The provenance the measures of a value's training record (value_provenance, as its
    checkpoint)."""
    with open(path) as f:
        return json.load(f)["made_by"]


@torch.no_grad()
def evaluate(value, batches, method, lam, gamma, stop_gradient=True):
    """One pass over the held-out responses: value.ValueReport's measures against the realised
    return, and the training method's own loss (weighted by states; printed, never used to choose).
    """
    report, total, weight = ValueReport(gamma), 0.0, 0
    for states, mask, rewards in batches:
        report.add(value, states, mask, rewards)
        loss = bellman_loss(value, states, mask, rewards, method, lam, gamma, stop_gradient)
        total += loss.item() * mask.sum().item()
        weight += mask.sum().item()
    return {"held_out_loss": total / weight if weight else float("nan"), **report.summary()}


def counted_terms(method):
    """What the loss averages over, so a batch split over processes can be weighed
    (parallel.split_loss): the real states for td, the responses for the official loss."""
    return (lambda mask: mask.sum().item()) if method == "td" else (lambda mask: mask.shape[0])


def kept_epoch(history):
    """The record of the epoch whose checkpoint was kept (the last one that improved)."""
    return [h for h in history if h["kept"]][-1]


def train(rollouts, train_ids, held_out_ids, value_config, config, device=None, log=print):
    """Adam on the Bellman loss (E6). After every epoch, V is measured on the held-out responses
    against the realised return at every state (value.ValueReport), and the epoch with the smallest
    error is kept: the same yardstick for every method, since a method's own loss can fall while V
    stays flat. config: a TrainingConfig. Returns V as it was at the kept epoch (frozen, in eval
    mode) and the measures of every epoch; the kept one is the last marked "kept" (kept_epoch).
    Nothing is written: build_value saves V once it is complete. V trains on `device` (default: the
    CPU), in fp32."""
    if not held_out_ids:
        log("no held-out prompts: the last epoch is kept, and no step size can be calibrated")
    torch.manual_seed(config.seed)
    value = ValueFunction(value_config).to(device)
    optimizer = torch.optim.Adam(value.parameters(), lr=config.lr)
    # under torchrun: each process takes its part of every batch
    learner = parallel.data_parallel(value)
    loss_settings = (config.method, config.lam, config.gamma, config.stop_gradient)

    def e6(v, states, mask, rewards):
        return bellman_loss(v, states, mask, rewards, *loss_settings)

    best, best_state, history, t0 = float("inf"), None, [], time.time()
    for epoch in range(1, config.epochs + 1):
        value.train()
        total, n = 0.0, 0
        for states, mask, rewards in rollouts.batches(train_ids, config.batch_size,
                                                      config.seed * 1000 + epoch, device):
            # V must also be right a little off the visited states, where E7 moves them
            if config.state_noise:
                scale = config.state_noise * states.norm(dim=-1,
                                                         keepdim=True) / states.shape[-1] ** 0.5
                # the same noise in every process
                states = states + scale * torch.randn_like(states)
            loss = parallel.split_loss(learner, e6, states, mask, rewards,
                                       counted_terms(config.method))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, n = total + loss.item() / parallel.world_size() * len(rewards), n + len(rewards)
        value.eval()
        record = {"epoch": epoch, "train_loss": parallel.total(total) / max(n, 1),
                  **evaluate(value, rollouts.batches(held_out_ids, 256, device=device),
                             *loss_settings)}
        # without held-out data: the latest epoch
        score = record["error"] if held_out_ids else -epoch
        record["kept"] = math.isfinite(record["train_loss"]) and score < best
        history.append(record)
        if record["kept"]:
            best, best_state = score, copy.deepcopy(value.state_dict())
        log_epoch(log, record, config, (time.time() - t0) / epoch * (config.epochs - epoch))
    if best_state is None:
        raise ValueError("no epoch produced a usable value function (the losses were not finite); "
                         "nothing was written. Check --lr and --gamma")
    value.load_state_dict(best_state)
    return value.requires_grad_(False).eval(), history


def log_epoch(log, record, config, eta):
    log(f"epoch {record['epoch']:3d}/{config.epochs} | {config.method} loss "
        f"{record['train_loss']:.4f} (held-out {record['held_out_loss']:.4f}) | held-out error of "
        f"V vs return {record['error']:.4f} (constant {record['best_constant']:.4f}), corr "
        f"{record['corr']:+.3f}, spread {record['spread']:.3f} | ETA "
        f"{eta:.0f}s{' | kept' if record['kept'] else ''}")


# -----------------------------------------------------------------------------
# choosing the strength of the control on validation prompts (E7)

def calibrate_control(model, enc, prompts, value, reward_fn, sampling, config, target=None,
                      is_grammatical=None, seed=0, log=print):
    """Choose how far E7 may move the state, on validation prompts: the largest of config.radii
    (||u|| <= radius * ||o||), tried smallest first, whose mean per-token KL from the base model
    stays within config.kl_budget (and, with a grammar check, whose grammatical fraction stays >=
    config.min_grammar_ratio x the base model's). Returns (radius or None when even the smallest
    breaks the budget, the curve it came from).

    The radius, not alpha, is the knob: alpha * grad V moves the state by an amount that depends on
    how steep this particular V is (and so on the machine and the seed that trained it), while the
    radius is a distance in the state's own units. The prompts must be validation prompts (never the
    test prompts): this is a choice of a hyper-parameter. The sweep stops at the first radius over
    budget, so a noisy pass further on is never taken.
    """
    jobs = [p for p in prompts for _ in range(config.samples_per_prompt)]

    def measure(edit):
        rows, _ = sample_many(model, enc, jobs, sampling, seed, reward_fn, edit)
        point = {"kl": sum(r["kl"] for r in rows) / len(rows),
                 "reward": sum(r["reward"] for r in rows) / len(rows)}
        if is_grammatical is not None:
            point["grammatical"] = sum(is_grammatical(r["response"]) for r in rows) / len(rows)
        return point

    base = measure(None)
    curve, chosen = [{"radius": 0, **base, "ok": True}], None
    for radius in config.radii:
        control = ControlConfig(config.step_size, config.n_steps, radius=radius, target=target)
        point = measure(Controller(value, control))
        fluent = is_grammatical is None or \
            point["grammatical"] >= config.min_grammar_ratio * base["grammatical"]
        point["ok"] = point["kl"] <= config.kl_budget and fluent
        curve.append({"radius": radius, **point})
        grammar = f", grammatical {point['grammatical']:.1%}" if is_grammatical else ""
        log(f"calibration: radius {radius:<4g} | reward {point['reward']:+.3f} (base "
            f"{base['reward']:+.3f}) | KL/token {point['kl']:.3f}{grammar} | "
            f"{'within budget' if point['ok'] else 'over budget: stop'}")
        if not point["ok"]:
            break
        chosen = radius
    return chosen, curve


# -----------------------------------------------------------------------------
# the whole job: rollouts -> V -> the strength of its control


def build_value(model, enc, prompts, reward_name, out, rollouts_folder, sampling, value_config,
                training, calibration, model_id, overwrite=False, shard_size=512, log=print):
    """See build_value_locked: the same, one job at a time on `out` and on the rollout folder (a
    lock taken before anything is checked and held until the last write; under torchrun, by rank 0).
    """
    with ExitStack() as held:
        if parallel.is_main():
            held.enter_context(Lock(out, log))
            held.enter_context(Lock(rollouts_folder, log))
        return build_value_locked(model, enc, prompts, reward_name, out, rollouts_folder, sampling,
                                  value_config,
                                  training, calibration, model_id, overwrite, shard_size, log)


def build_value_locked(model, enc, prompts, reward_name, out, rollouts_folder, sampling,
                       value_config, training, calibration, model_id, overwrite=False,
                       shard_size=512, log=print):
    """Collect rollouts of `model` on `prompts` scored by the reward `reward_name` (into
    rollouts_folder), train V on them (TrainingConfig), calibrate its control on the held-out
    prompts (CalibrationConfig), and save it all to `out` (once, at the end; with the measures of
    every epoch beside it). sampling: a SamplingConfig with max_new_tokens set. An `out` or a
    rollout folder made by another job is replaced only with `overwrite`. Returns (V, the checkpoint
    dict, the history)."""
    device = model.wte.weight.device
    reward_fn = worlds.load_reward(reward_name, device=device)
    job = rollout_job(model, enc, prompts, reward_name, model_id)
    train_args = {**job, "rollouts": rollouts_folder, "sampling": asdict(sampling),
                  "value": asdict(value_config), "training": asdict(training),
                  "calibration": asdict(calibration)}
    provenance = value_provenance(model_id, model, reward_name, train_args)
    check_overwrite(out, provenance, read_value_provenance, overwrite)
    check_overwrite(history_path(out), provenance, read_history_provenance, overwrite)
    if parallel.is_main():
        remove_leftovers(os.path.dirname(os.path.abspath(out)), log)
    collect_rollouts(model, enc, prompts, reward_fn, rollouts_folder, sampling, seed=training.seed,
                     shard_size=shard_size, made_by=job, overwrite=overwrite, log=log)
    train_ids, held_out_ids = split_prompts(len(prompts), training)
    name = "the official loss" if training.method == "official" else (
        f"TD(lambda = {training.lam:g})"
        + ("" if training.stop_gradient else " without stop-gradient"))
    log(f"training V on {len(train_ids)} prompts, {len(held_out_ids)} held out ({name}, gamma "
        f"{training.gamma})")
    rollouts = Rollouts(rollouts_folder, training.drop_unfinished)
    report_unfinished(rollouts, sampling, training, log)
    value, history = train(rollouts, train_ids, held_out_ids, value_config, training, device,
                           log=log)
    best = kept_epoch(history)
    log(f"kept epoch {best['epoch']}: held-out error {best['error']:.4f} against "
        f"{best['best_constant']:.4f} for the best constant, correlation with the return "
        f"{best['corr']:+.3f}")
    control = {}
    if held_out_ids:
        held_out = [prompts[i] for i in held_out_ids]
        control = calibrated_control(model, enc, held_out, value, reward_fn, reward_name, sampling,
                                     calibration, training, rollouts, train_ids, log)
    if parallel.is_main():  # under torchrun, rank 0 writes what every process computed
        save_value(out, value.cpu(), provenance, metrics=best, control=control)
        write_text_atomically(history_path(out),
                              json.dumps({"made_by": provenance, "history": history}))
    parallel.barrier()  # the checkpoint is on disk before any process reads it
    _, checkpoint = load_value(out)
    log(f"value checkpoint: {out}")
    return value.to(device), checkpoint, history


def calibrated_control(model, enc, held_out, value, reward_fn, reward_name, sampling, calibration,
                       training, rollouts, train_ids, log):
    """The settings of E7 stored with V: its step and steps, and the radius calibrate_control chose
    on the held-out prompts (with the curve it came from)."""
    target = None if calibration.target_quantile is None else \
        rollouts.reward_quantile(train_ids, calibration.target_quantile)
    log(f"choosing how far the control may move the state, on the {len(held_out)} held-out "
        f"prompts (alpha {calibration.step_size:g}, n {calibration.n_steps}, target V "
        f"{'none' if target is None else f'{target:+.3f}'}, KL budget "
        f"{calibration.kl_budget}/token)")
    radius, curve = calibrate_control(model, enc, held_out, value, reward_fn, sampling, calibration,
                                      target, worlds.grammar_check(reward_name),
                                      seed=training.seed + 1, log=log)
    log("even the smallest radius costs more than the KL budget: the control is off by default"
        if radius is None else f"radius {radius:g}, stored with V; generate.py uses it unless "
                               "given --radius")
    return {"step_size": calibration.step_size if radius else 0.0, "n_steps": calibration.n_steps,
            "radius": radius, "target": target, "kl_budget": calibration.kl_budget, "curve": curve}


def split_prompts(n_prompts, training):
    """(training prompt ids, held-out prompt ids): a fraction training.held_out of the prompts,
    drawn by seed."""
    ids = list(range(n_prompts))
    random.Random(training.seed).shuffle(ids)
    n_held = round(len(ids) * training.held_out)
    return ids[n_held:], ids[:n_held]


def report_unfinished(rollouts, sampling, training, log):
    """Say how many rollouts were cut at max_new_tokens before they ended, and refuse to train on
    none."""
    ended, total = rollouts.finished_fraction()
    if ended < total:
        log(f"rollouts: {total - ended} of {total} responses ({(total - ended) / total:.0%}) were "
            f"cut at {sampling.max_new_tokens} tokens before they ended; R scores them as they "
            "are. "
            + ("They are left out of training (--drop-unfinished)." if training.drop_unfinished else
               "--drop-unfinished trains V without them; --max-new-tokens lets them finish."))
    if training.drop_unfinished and ended == 0:
        raise ValueError("every response was cut at --max-new-tokens, so --drop-unfinished leaves "
                         "nothing to train on; raise --max-new-tokens")


def main(argv=None):
    parser = script_parser(__doc__, prompts="toy-train",
                           sampling=SamplingConfig(samples_per_prompt=48))
    parser.add_argument("--out", default=DEFAULT_OUT, help="the value checkpoint to write")
    parser.add_argument("--rollouts", default=None,
                        help="folder for the rollout shards (default: next to --out)")
    # V: its declared defaults (width 0: d)
    for config in (TrainingConfig(), CalibrationConfig(), ValueConfig):
        add_config_arguments(parser, config)
    parser.add_argument("--shard-size", type=int, default=512,
                        help="responses per rollout shard: an interrupted collection resumes at "
                             "its first missing shard; under torchrun the processes take the "
                             "shards in turn")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an --out checkpoint or --rollouts shards that another job "
                             "made")
    args = parser.parse_args(argv)

    def settings():  # every flag is checked before any work
        require((is_whole(args.shard_size, 1),
                 f"--shard-size must be a whole number >= 1, got {args.shard_size}"))
        check_dtype_and_device(args.dtype, args.device)
        config_from_args(ValueConfig, args, n_embd=1)
        configs = (config_from_args(TrainingConfig, args),
                   config_from_args(CalibrationConfig, args),
                   config_from_args(SamplingConfig, args))
        check_writable(args.out)
        if os.path.isfile(rollouts_of(args)):
            raise ValueError(f"--rollouts {rollouts_of(args)} is a file; name a folder")
        check_writable(os.path.join(rollouts_of(args), "shard"), "--rollouts")
        check_overwrite(args.out, None, read_value_provenance, args.overwrite)
        return configs

    training, calibration, sampling = checked(parser, settings)
    args.device = parallel.start(args.device)  # under torchrun: join the other processes
    rollouts = rollouts_of(args)
    prompts = worlds.load_prompts(args.prompts, args.chat)
    model, enc = worlds.load_model(args.model, dtype=args.dtype, device=args.device,
                                   tokenizer=args.tokenizer)
    sampling = sampling_from_args(args, model, enc, prompts, sampling)
    value_config = config_from_args(ValueConfig, args, n_embd=model.config.n_embd)
    _, _, history = build_value(model, enc, prompts, args.reward, args.out, rollouts, sampling,
                                value_config,
                                training, calibration, args.model, args.overwrite, args.shard_size)
    return history


def rollouts_of(args):
    """--rollouts, by default a folder beside --out."""
    return args.rollouts or os.path.splitext(args.out)[0] + "_rollouts"


INTERRUPTED = ("interrupted; rerun the same command to resume: the rollout shards written so far "
               "are kept")

if __name__ == "__main__":
    run_cli(main, INTERRUPTED)
