"""
Rewards R(x, y) (docs/method.md, E4). Every reward has one interface, reward(prompts, responses) ->
tensor (N,), higher is better:
- "sentiment": an English sentiment lexicon with negation, so GPT-2 can be steered out of the box;
- "rm:<folder>": a reward model (GPT2ForSequenceClassification, LlamaForSequenceClassification or
  UltraRM weights) read through model.py, the paper's set-up; "rm:<folder>::ultrarm" lays the text
  out as UltraRM expects;
- "<module>:<function>": any function of that signature that Python can import;
- the embedded worlds' own rewards, by name (worlds/).
"""

import importlib

import torch

from model import left_pad
from plumbing.checkpoints import from_pretrained, tokenizer_folder
from plumbing.tokenizer import load_tokenizer


def lexicon_sentiment(text, positive, negative, negators=("not",)):
    """Mean polarity of the sentiment words in `text`, each flipped by a negator earlier in its
    sentence.

    In [-1, 1]; 0 when the text has no sentiment word. Works on any text, grammatical or not.
    """
    total, count = 0, 0
    for sentence in text.lower().replace("!", ".").replace("?", ".").split("."):
        negated = False
        for word in sentence.replace(",", " ").split():
            if word in negators or word.endswith("n't"):
                negated = not negated
            polarity = (word in positive) - (word in negative)
            if polarity:
                total += -polarity if negated else polarity
                count += 1
    return total / count if count else 0.0


class CountingReward:
    """A reward function that counts how many responses it scored: the real cost of reward-guided
    methods."""

    def __init__(self, reward_fn):
        self.reward_fn, self.calls = reward_fn, 0

    def __call__(self, prompts, responses):
        self.calls += len(responses)
        return self.reward_fn(prompts, responses)


ENGLISH_POSITIVE = set("""good great excellent amazing wonderful fantastic lovely love loved
loves like liked enjoy enjoyed happy glad pleased delightful beautiful brilliant superb perfect
best better nice fine fun kind helpful awesome favorite impressive outstanding remarkable
pleasant charming recommend recommended success successful win wins won positive joy joyful
grateful thankful calm safe strong bright clean fresh warm friendly gentle easy exciting excited
inspiring cheerful""".split())
ENGLISH_NEGATIVE = set("""bad terrible awful horrible poor worst worse hate hated hates dislike
disliked sad angry annoying annoyed boring bored ugly disgusting disappointing disappointed fail
failed failure broken wrong useless waste wasted painful pain hurt sick dead death die died kill
killed fear afraid scary weak dirty cold harsh hard difficult nasty stupid problem problems
negative lose lost loss cry crying unhappy upset miserable lonely tired evil""".split())
ENGLISH_NEGATORS = ("not", "no", "never", "nothing", "nobody", "neither", "nor", "without")


def english_sentiment(prompts, responses):
    return torch.tensor([lexicon_sentiment(r, ENGLISH_POSITIVE, ENGLISH_NEGATIVE, ENGLISH_NEGATORS)
                         for r in responses])


RM_FORMATS = {  # rm:<folder>::<format>: the text a reward model reads
    # HH-RLHF reward models: the prompt is already "\n\nHuman: ...\n\nAssistant:"
    "plain": "{prompt}{response}",
    "ultrarm": "Human: {prompt}\nAssistant: {response}",  # UltraRM
}


class RewardModel:
    """A sequence-classification model (or UltraRM's regression head) as R: its score of prompt +
    response, laid out as `template` says, read at the last token, in batches."""

    def __init__(self, folder, dtype=None, device=None, batch_size=16,
                 template=RM_FORMATS["plain"]):
        self.model = from_pretrained(folder, dtype=dtype, device=device)
        if not self.model.config.n_labels:
            raise ValueError(f"{folder} is a language model, not a reward model; rm: needs a "
                             "GPT2ForSequenceClassification or LlamaForSequenceClassification "
                             "checkpoint")
        self.tokenizer = load_tokenizer(tokenizer_folder(folder))
        self.batch_size, self.template = batch_size, template

    @torch.no_grad()
    def __call__(self, prompts, responses):
        device = self.model.wte.weight.device
        limit = self.model.config.block_size
        texts = [self.template.format(prompt=p, response=r) for p, r in zip(prompts, responses)]
        rows = [self.tokenizer.encode(text, allowed_special="all")[-limit:] for text in texts]
        scores = []
        for i in range(0, len(rows), self.batch_size):
            idx, mask = left_pad(rows[i:i + self.batch_size], device)
            scores.append(self.model.reward_scores(idx, mask)[:, 0].float().cpu())
        return torch.cat(scores)


class CheckedReward:
    """A reward function whose every answer is checked: one finite number per response, as a float
    tensor (N,). A reward that raises, or answers with the wrong shape or NaN, is an error that
    names it."""

    def __init__(self, function, name):
        self.function, self.name = function, name

    def __call__(self, prompts, responses):
        try:
            scores = self.function(prompts, responses)
            scores = torch.as_tensor(scores, dtype=torch.float32).cpu()
        except Exception as e:
            raise ValueError(f"reward {self.name!r} failed on {len(responses)} responses: "
                             f"{type(e).__name__}: {e}") from e
        if scores.shape != (len(responses),):
            raise ValueError(f"reward {self.name!r} returned shape {tuple(scores.shape)} for "
                             f"{len(responses)} responses; it must return one number per "
                             f"response, shape ({len(responses)},)")
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"reward {self.name!r} returned {scores[bad[0]].item()} for "
                             f"{len(bad)} of {len(responses)} responses (e.g. "
                             f"{responses[bad[0]]!r}); it must return finite numbers")
        return scores


def load_reward(spec, device=None, named=None):
    """The reward function named by `spec` (see the top of this file), its answers checked
    (CheckedReward); `named`: more rewards by name ({name: function}, the embedded worlds')."""
    rewards = {**(named or {}), "sentiment": english_sentiment}
    if spec in rewards:
        return CheckedReward(rewards[spec], spec)
    if spec.startswith("rm:"):
        folder, _, form = spec[3:].partition("::")
        if form and form not in RM_FORMATS:
            raise ValueError(f"reward {spec!r}: unknown format {form!r} after '::'; use one of "
                             f"{', '.join(RM_FORMATS)}")
        return CheckedReward(RewardModel(folder, device=device,
                                         template=RM_FORMATS[form or "plain"]), spec)
    if ":" in spec:
        module_name, function_name = spec.rsplit(":", 1)
        try:
            function = getattr(importlib.import_module(module_name), function_name)
        except Exception as e:  # a missing module or name, or a module that fails when imported
            raise ValueError(f"reward {spec!r}: cannot import {function_name} from {module_name} "
                             f"({type(e).__name__}: {e})") from None
        if not callable(function):
            raise ValueError(f"reward {spec!r}: {function_name} is not callable")
        return CheckedReward(function, spec)
    raise ValueError(f"unknown reward {spec!r}; use one of {', '.join(rewards)}, rm:<reward model "
                     "folder>, or module:function")
