"""
The verdict world (docs/verdict_world.md): the paper's setting in miniature. Reviews in the toy
world's grammar, longer and looser; a prompt gives the review's opening sentence, and a **judge**, a
rule in code that no prefix of the response reveals, says whether the review ends on a positive
verdict. The reward that V and the baselines read is a **learned reward model** trained on the
judge's preferences between complete responses (worlds/reward_model.py), a proxy with errors, as the
paper's are.
"""

import os
import random
import re
from dataclasses import replace

import torch

from plumbing.rewards import lexicon_sentiment
from worlds import toy

OUT = "out/verdict"
WORLD = toy.WorldConfig(sentences=(3, 4, 5), sentence_weights=(1, 1, 1), coherence=0.6)
PRETRAIN = toy.PretrainConfig(block_size=64)
OPENING_SEED = 7  # which opening sentence each (reviewer, product) pair gets


def base_model(spec="verdict", log=print):
    """(model, tokenizer) of "verdict" or "verdict@SEED": pretrained once on the world's reviews,
    cached."""
    _, _, seed = spec.partition("@")
    if seed and not seed.isdigit():
        raise ValueError(f"model {spec!r}: the pretraining seed after '@' must be a whole number, "
                         "e.g. verdict@1")
    return toy.base_model(OUT, WORLD, replace(PRETRAIN, seed=int(seed or 0)), log)


def reward_model_folder(base_seed=0):
    """Where the reward model for the base model of pretraining seed `base_seed` is kept."""
    return os.path.join(OUT, "rm" if not base_seed else f"rm-seed{base_seed}")


def prompts(split):
    """The prompts of "train" (180) or "test" (60): each (reviewer, product) pair of the split
    twice, once with a positive opening sentence and once with a negative one (the base model tends
    to go on as a review began)."""
    world = toy.World(WORLD)
    pairs = world.train_pairs if split == "train" else world.test_pairs
    rng = random.Random(OPENING_SEED + (split == "test"))
    out = []
    for name, product in pairs:
        for wanted in (1, -1):
            while True:  # a sentence of the grammar with the wanted polarity
                opening = world.sample_response(name, product, rng).split(" .")[0] + " ."
                if polarity(opening) == wanted:
                    break
            out.append(f"{world.prompt(name, product)}{opening}")
    return out


# -----------------------------------------------------------------------------
# the judge: the review ends on a positive verdict


def sentences(text):
    """The complete sentences of a text (each ending in " ."), without their full stops."""
    return [s.strip() for s in re.findall(r"[^.]*\.", text) if s.strip(" .")]


def polarity(sentence):
    """+1 or -1: the sign of a sentence's lexicon sentiment with negation (0 for a sentence without
    one)."""
    score = lexicon_sentiment(sentence, toy.POSITIVE, toy.NEGATIVE)
    return (score > 0) - (score < 0)


def judge(prompts, responses):
    """The verdict world's judge, (N,) of +1 or -1: +1 when the response is grammatical and its last
    sentence is positive, else -1. What decides it comes last; the prompt's opening sentence does
    not count."""
    scores = []
    for response in responses:
        said = sentences(response)
        good = toy.is_grammatical(response) and bool(said) and polarity(said[-1]) > 0
        scores.append(1.0 if good else -1.0)
    return torch.tensor(scores)


def judge_of_prefix(prompt, tokens, enc, fraction, score):
    """score(prompt, the complete sentences in the first `fraction` of the response tokens); 0 with
    none."""
    text = enc.decode(tokens[:int(len(tokens) * fraction)])
    complete = text[:text.rfind(" .") + 2] if " ." in text else ""
    return float(score([prompt], [complete])[0]) if complete else 0.0
