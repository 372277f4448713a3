"""
The verdict world's reward model, its R of E4 (docs/verdict_world.md): a transformer of model.py
with a scalar head, trained the way reward models are, with Bradley-Terry on pairs of complete
base-model responses to one prompt that the judge tells apart. It never reads the judge's rule, only
its preferences. Also the measurement that shows the judge is decided late, which needs the base
model's samples.

    # the reward model (trained once, cached), its held-out pair accuracy, and how much the first f
    # of a response tells of its final score:
    python -m worlds.verdict_rm
    python -m worlds.verdict_rm --seed 1     # the same for the base model pretrained from seed 1
"""

import json
import os
import random
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from generate import SamplingConfig, response_length, sample_many
from model import GPT, left_pad
from plumbing.checkpoints import from_pretrained, save_pretrained
from plumbing.cli import new_parser, run_cli
from plumbing.files import write_text_atomically
from plumbing.tokenizer import save_tokenizer
from worlds import toy, verdict


@dataclass
class RewardModelConfig:
    # 0: the base model's depth (a call then costs a forward pass of the base model)
    n_layer: int = 0
    # 0: the base model's width; at the base model's shape it starts from its weights
    n_embd: int = 0
    # base-model responses sampled per training prompt, paired by the judge
    responses_per_prompt: int = 16
    epochs: int = 3
    lr: float = 3e-4
    batch_size: int = 32  # pairs per step
    seed: int = 0  # of the samples, the initialisation of the head and the order of the pairs


def judged_pairs(model, enc, prompts, samples, seed):
    """(prompt, preferred response, other response) for every two sampled responses to one prompt
    that the judge scores differently."""
    jobs = [p for p in prompts for _ in range(samples)]
    rows, _ = sample_many(model, enc, jobs,
                          SamplingConfig(max_new_tokens=response_length(model, enc, prompts)), seed)
    scores = verdict.judge(jobs, [r["response"] for r in rows]).tolist()
    pairs = []
    for i in range(0, len(jobs), samples):
        group = list(zip(rows[i:i + samples], scores[i:i + samples]))
        good = [r["response"] for r, s in group if s > 0]
        bad = [r["response"] for r, s in group if s < 0]
        pairs += [(jobs[i], g, b) for g in good for b in bad]
    return pairs


def scores_of(rm, enc, prompts, responses):
    """The reward model's scores (B,) of prompt + response, read at the last token."""
    idx, mask = left_pad([enc.encode(p + r) for p, r in zip(prompts, responses)],
                         rm.wte.weight.device)
    return rm.reward_scores(idx, mask)[:, 0].float()


def bradley_terry_loss(rm, enc, pairs):
    """-log sigmoid(r(preferred) - r(other)), the mean over the pairs."""
    prompts = [p for p, _, _ in pairs]
    preferred = scores_of(rm, enc, prompts, [g for _, g, _ in pairs])
    other = scores_of(rm, enc, prompts, [b for _, _, b in pairs])
    return -F.logsigmoid(preferred - other).mean()


@torch.no_grad()
def pair_accuracy(rm, enc, pairs, batch_size=128):
    """The fraction of pairs the reward model orders as the judge does."""
    right = 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        prompts = [p for p, _, _ in chunk]
        right += int((scores_of(rm, enc, prompts, [g for _, g, _ in chunk])
                      > scores_of(rm, enc, prompts, [b for _, _, b in chunk])).sum())
    return right / max(len(pairs), 1)


def new_reward_model(base, config):
    """A GPT with a scalar head; at the base model's shape, its weights start from the base model's.
    """
    shape = dict(n_layer=config.n_layer or base.config.n_layer,
                 n_embd=config.n_embd or base.config.n_embd)
    torch.manual_seed(config.seed)
    rm = GPT(replace(base.config, n_labels=1, head_dim=0, intermediate_size=0, **shape))
    if shape == dict(n_layer=base.config.n_layer, n_embd=base.config.n_embd):
        rm.load_state_dict({k: v for k,
                            v in base.state_dict().items() if not k.startswith("lm_head")},
                           strict=False)
    return rm


def train_reward_model(base, enc, config=RewardModelConfig(), log=print):
    """(the reward model, its held-out pair accuracy): Bradley-Terry on judged pairs of base-model
    responses to the training prompts; the accuracy on pairs of responses to the test prompts."""
    train_pairs = judged_pairs(base, enc, verdict.prompts("train"), config.responses_per_prompt,
                               config.seed)
    test_pairs = judged_pairs(base, enc, verdict.prompts("test"), 8, config.seed + 1)
    log(f"reward model: {len(train_pairs)} training pairs, {len(test_pairs)} held-out pairs")
    rm = new_reward_model(base, config).train()
    optimizer = torch.optim.Adam(rm.parameters(), lr=config.lr)
    rng, t0 = random.Random(config.seed), time.time()
    for epoch in range(1, config.epochs + 1):
        rng.shuffle(train_pairs)
        for i in range(0, len(train_pairs), config.batch_size):
            loss = bradley_terry_loss(rm, enc, train_pairs[i:i + config.batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        rm.eval()
        accuracy = pair_accuracy(rm, enc, test_pairs)
        rm.train()
        log(f"reward model: epoch {epoch}/{config.epochs}, loss {loss.item():.3f}, held-out pair "
            f"accuracy {accuracy:.1%} ({time.time() - t0:.0f}s)")
    return rm.eval().requires_grad_(False), accuracy


def reward_model(base_seed=0, config=RewardModelConfig(), log=print):
    """The folder of the reward model for the base model pretrained from base_seed: trained the
    first time (with these settings), then read from out/verdict/. Returns (folder, held-out pair
    accuracy)."""
    folder = verdict.reward_model_folder(base_seed)
    settings = {"base_seed": base_seed, **asdict(config)}
    settings_path = os.path.join(folder, "settings.json")
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            recorded = json.load(f)
        if {k: recorded.get(k) for k in settings} == settings:
            return folder, recorded["accuracy"]
    base, enc = verdict.base_model(f"verdict@{base_seed}", log=log)
    log(f"training the verdict world's reward model into {folder} (once; later runs reuse it)")
    rm, accuracy = train_reward_model(base, enc, config, log)
    save_pretrained(rm, folder)
    save_tokenizer(enc, folder)
    # written last
    write_text_atomically(settings_path, json.dumps({**settings, "accuracy": accuracy}))
    return folder, accuracy


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--seed", type=int, default=0,
                        help="the pretraining seed of the worlds' base models")
    args = parser.parse_args(argv)
    folder, accuracy = reward_model(args.seed)
    print(f"reward model {folder}: held-out pair accuracy {accuracy:.1%}")
    print("\ncorrelation of the score of the first f of a response with the score of the whole "
          "response (base model, 8 responses to each test prompt):\n")
    print("| world | score | f = 0.25 | f = 0.5 | f = 0.75 | mean score of whole responses |\n"
          "|---|---|---|---|---|---|")
    suffix = f"@{args.seed}" if args.seed else ""
    rm = from_pretrained(folder)
    base, enc = verdict.base_model(f"verdict{suffix}")
    for name, (model, enc), prompts, score, what in [
            ("toy", toy.load_variant(f"toy{suffix}"), toy.World().test_prompts(), toy.reward,
             "lexicon reward"),
            ("verdict", (base, enc), verdict.prompts("test"), verdict.judge, "judge"),
            ("verdict", (base, enc), verdict.prompts("test"), lambda p, r: scores_of(rm, enc, p, r),
             "reward model")]:
        found, mean = prefix_correlations(model, enc, prompts, score)
        cells = " | ".join(f"{c:+.2f}" for c in found.values())
        print(f"| {name} | {what} | {cells} | {mean:+.2f} |")


@torch.no_grad()
def prefix_correlations(model, enc, prompts, score, samples=8, fractions=(0.25, 0.5, 0.75), seed=0):
    """{f: correlation between score(first f of a response) and score(the whole response)} over
    base-model responses (`samples` per prompt), and the mean score of the whole responses."""
    jobs = [p for p in prompts for _ in range(samples)]
    rows, _ = sample_many(model, enc, jobs,
                          SamplingConfig(max_new_tokens=response_length(model, enc, prompts)), seed)
    whole = torch.as_tensor(score(jobs, [r["response"] for r in rows])).float()
    found = {}
    for f in fractions:
        part = torch.tensor([verdict.judge_of_prefix(p, r["tokens"], enc, f, score) for p,
                             r in zip(jobs, rows)])
        found[f] = torch.corrcoef(torch.stack([part, whole]))[0, 1].nan_to_num().item()
    return found, whole.mean().item()


if __name__ == "__main__":
    run_cli(main)
