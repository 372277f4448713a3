"""
What RE-Control is applied to: a base model, prompts x, and a reward R(x, y) (docs/method.md, E4).

Every reward has one interface, reward(prompts, responses) -> tensor (N,), higher is better:
- "toy": the embedded toy world's sentiment (toyworld.py);
- "sentiment": an English sentiment lexicon with negation, so GPT-2 can be steered out of the box;
- "rm:<folder>": a reward model (GPT2ForSequenceClassification or LlamaForSequenceClassification weights)
  read through model.py, the paper's set-up;
- "<module>:<function>": any function of that signature that Python can import.
"""

import gzip
import importlib
import json
import os

import torch

import toyworld
from checkpoints import from_pretrained, resolve_checkpoint
from model import left_pad
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
# models


def load_model(spec, dtype=None, device=None, log=print):
    """(model, tokenizer) for a toy world ("toy", "toy-long", "toy@seed"; toyworld.VARIANTS) or anything
    checkpoints.from_pretrained loads."""
    if toyworld.is_variant(spec):
        model, enc = toyworld.load_variant(spec, log=log)
        return model.to(device) if device else model, enc
    model = from_pretrained(spec, dtype=dtype, device=device)
    return model, load_tokenizer(resolve_checkpoint(spec))


def check_prompts_fit(model, enc, prompts, max_new_tokens=None):
    """The response length to sample: max_new_tokens, or by default as many as the model's context leaves after
    the longest prompt, at most 128 (the paper's). Fails before sampling anything when they cannot fit."""
    lengths = [len(enc.encode(p, allowed_special="all")) for p in prompts]
    longest = max(range(len(prompts)), key=lengths.__getitem__)
    room = model.config.block_size - lengths[longest]
    if max_new_tokens is None:
        max_new_tokens = min(128, room)
    if max_new_tokens > room or max_new_tokens < 1:
        raise ValueError(f"prompt {longest + 1} has {lengths[longest]} tokens; with max_new_tokens {max_new_tokens} "
                         f"that exceeds the model's context of {model.config.block_size}; shorten the prompts or "
                         "lower --max-new-tokens")
    return max_new_tokens


# -----------------------------------------------------------------------------
# prompts

HH_ASSISTANT = "\n\nAssistant:"


def hh_prompt(dialogue):
    """Anthropic HH-RLHF: the prompt is the dialogue up to and including its last 'Assistant:' turn marker."""
    cut = dialogue.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError("an HH-RLHF dialogue has no '\\n\\nAssistant:' turn")
    return dialogue[:cut + len(HH_ASSISTANT)]


def load_prompts(path):
    """Prompts from "toy-train" / "toy-test", a text file (one per line), JSONL with a "prompt" field, or
    Anthropic HH-RLHF .jsonl / .jsonl.gz files (records with "chosen" and "rejected" dialogues)."""
    if path in ("toy-train", "toy-test"):
        world = toyworld.World()
        return world.train_prompts() if path == "toy-train" else world.test_prompts()
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt file {path} does not exist (or use toy-train / toy-test)")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    if path.removesuffix(".gz").endswith((".jsonl", ".json")):
        prompts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not JSON ({e})") from None
            if isinstance(record, dict) and "prompt" in record:
                prompts.append(record["prompt"])
            elif isinstance(record, dict) and "chosen" in record:
                try:
                    prompts.append(hh_prompt(record["chosen"]))
                except ValueError as e:
                    raise ValueError(f"{path}, line {n}: {e}") from None
            else:
                raise ValueError(f"{path}, line {n}: expected a JSON object with a \"prompt\" field "
                                 "(or HH-RLHF's \"chosen\")")
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts; write one prompt per line (or JSONL with a \"prompt\" field)")
    return prompts


# -----------------------------------------------------------------------------
# rewards

ENGLISH_POSITIVE = set("""good great excellent amazing wonderful fantastic lovely love loved loves like liked enjoy
enjoyed happy glad pleased delightful beautiful brilliant superb perfect best better nice fine fun kind helpful
awesome favorite impressive outstanding remarkable pleasant charming recommend recommended success successful win
wins won positive joy joyful grateful thankful calm safe strong bright clean fresh warm friendly gentle easy
exciting excited inspiring cheerful""".split())
ENGLISH_NEGATIVE = set("""bad terrible awful horrible poor worst worse hate hated hates dislike disliked sad angry
annoying annoyed boring bored ugly disgusting disappointing disappointed fail failed failure broken wrong useless
waste wasted painful pain hurt sick dead death die died kill killed fear afraid scary weak dirty cold harsh hard
difficult nasty stupid problem problems negative lose lost loss cry crying unhappy upset miserable lonely tired
evil""".split())
ENGLISH_NEGATORS = ("not", "no", "never", "nothing", "nobody", "neither", "nor", "without")


def english_sentiment(prompts, responses):
    return torch.tensor([toyworld.lexicon_sentiment(r, ENGLISH_POSITIVE, ENGLISH_NEGATIVE, ENGLISH_NEGATORS)
                         for r in responses])


class RewardModel:
    """A sequence-classification model as R: the score of label 0 for prompt + response, in batches."""

    def __init__(self, folder, dtype=None, device=None, batch_size=16):
        self.model = from_pretrained(folder, dtype=dtype, device=device)
        if not self.model.config.n_labels:
            raise ValueError(f"{folder} is a language model, not a reward model; rm: needs a "
                             "GPT2ForSequenceClassification or LlamaForSequenceClassification checkpoint")
        self.tokenizer = load_tokenizer(resolve_checkpoint(folder))
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompts, responses):
        device = self.model.wte.weight.device
        limit = self.model.config.block_size
        rows = [self.tokenizer.encode(p + r, allowed_special="all")[-limit:] for p, r in zip(prompts, responses)]
        scores = []
        for i in range(0, len(rows), self.batch_size):
            idx, mask = left_pad(rows[i:i + self.batch_size], device)
            scores.append(self.model.reward_scores(idx, mask)[:, 0].float().cpu())
        return torch.cat(scores)


REWARDS = {"toy": toyworld.reward, "sentiment": english_sentiment}


def grammar_check(spec):
    """The exact fluency check that comes with a reward: the toy world's grammar for "toy", else None."""
    return toyworld.is_grammatical if spec == "toy" else None


def load_reward(spec, device=None):
    """The reward function named by `spec` (see the top of this file)."""
    if spec in REWARDS:
        return REWARDS[spec]
    if spec.startswith("rm:"):
        return RewardModel(spec[3:], device=device)
    if ":" in spec:
        module_name, function_name = spec.rsplit(":", 1)
        try:
            function = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward {spec!r}: cannot import {function_name} from {module_name} ({e})") from None
        if not callable(function):
            raise ValueError(f"reward {spec!r}: {function_name} is not callable")
        return function
    raise ValueError(f"unknown reward {spec!r}; use one of {', '.join(REWARDS)}, rm:<reward model folder>, "
                     "or module:function")
