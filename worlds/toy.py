"""
The embedded default: a small world in which RE-Control can be run end to end on a laptop CPU, no
downloads.

- A synthetic language of product reviews from a seeded probabilistic grammar. A prompt names a
  reviewer and a product ("ann reviews the drone :"); the response is one to three short sentences
  ("the battery is not very good . i would recommend it ."). Each product has a hidden quality and
  each reviewer a mood, so the base model's responses are mixed, and some prompts lean positive,
  others negative.
- The reward R (E4) is the sentiment of the response, from a lexicon with negation: in [-1, 1].
- `is_grammatical` checks a text against the grammar exactly, so fluency is measured, not guessed.
- A byte-level tiktoken encoding whose extra tokens are the words of the language, one token each.
- A small GPT-2-architecture base model from model.py, pretrained here on the CPU and cached under
  out/.
- Prompts split into train and test, so the value function is judged on prompts it never saw.

    python generate.py      # pretrains the base model the first time, then prints samples, rewards
"""

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, replace

import torch

from model import GPT, GPTConfig
from plumbing.checkpoints import from_pretrained, save_pretrained
from plumbing.files import write_text_atomically
from plumbing.rewards import lexicon_sentiment
from plumbing.tokenizer import byte_encoding, load_tokenizer, save_tokenizer

# -----------------------------------------------------------------------------
# the language

NAMES = ["ann", "bob", "cleo", "dan", "eve", "finn", "gus", "hana", "ivan", "jo"]
PRODUCTS = ["phone", "laptop", "tablet", "watch", "speaker", "camera", "printer", "router",
            "monitor", "blender", "kettle", "drone"]
ASPECTS = ["screen", "battery", "price", "design", "sound", "speed", "build", "support"]
GOOD_ADJECTIVES = ["great", "good", "excellent", "lovely", "superb", "solid"]
BAD_ADJECTIVES = ["bad", "poor", "awful", "terrible", "weak", "flimsy"]
INTENSIFIERS = ["very", "really", "quite"]
GOOD_VERBS = ["love", "like", "enjoy"]
BAD_VERBS = ["hate", "dislike", "regret"]
FUNCTION_WORDS = ["reviews", "the", "is", "not", "i", "do", "would", "recommend", "it", ".", ":"]
POSITIVE = set(GOOD_ADJECTIVES + GOOD_VERBS + ["recommend"])
NEGATIVE = set(BAD_ADJECTIVES + BAD_VERBS)


@dataclass
class WorldConfig:
    seed: int = 1234  # fixes qualities, moods and the train/test split
    quality_scale: float = 1.2  # spread of the products' hidden quality (logits)
    mood_scale: float = 0.6  # spread of the reviewers' mood (logits)
    coherence: float = 0.85  # how often a sentence follows its review's overall polarity
    negation_rate: float = 0.2  # how often a sentence says "not" (and flips its adjective or verb)
    test_fraction: float = 0.25
    sentences: tuple = (1, 2, 3)  # how many sentences a review has, drawn with these weights
    sentence_weights: tuple = (0.3, 0.4, 0.3)


class World:
    def __init__(self, config=WorldConfig()):
        self.config = config
        rng = random.Random(config.seed)
        self.quality = {p: rng.gauss(0, config.quality_scale) for p in PRODUCTS}
        self.mood = {n: rng.gauss(0, config.mood_scale) for n in NAMES}
        prompts = [(n, p) for n in NAMES for p in PRODUCTS]
        rng.shuffle(prompts)
        n_test = round(len(prompts) * config.test_fraction)
        self.test_pairs, self.train_pairs = prompts[:n_test], prompts[n_test:]

    @staticmethod
    def prompt(name, product):
        return f"{name} reviews the {product} :"

    def train_prompts(self):
        return [self.prompt(*p) for p in self.train_pairs]

    def test_prompts(self):
        return [self.prompt(*p) for p in self.test_pairs]

    def positive_rate(self, name, product):
        return 1 / (1 + math.exp(-(self.quality[product] + self.mood[name])))

    def sample_response(self, name, product, rng):
        """A response from the grammar: a few sentences (config.sentences). The review is positive
        with the prompt's positive rate, and each sentence follows the review's polarity with
        probability `coherence` (reviews are coherent, so the model must carry "how the review is
        going" in its state)."""
        review_good = rng.random() < self.positive_rate(name, product)
        sentences = []
        for _ in range(rng.choices(self.config.sentences, weights=self.config.sentence_weights)[0]):
            good = review_good == (rng.random() < self.config.coherence)
            negate = rng.random() < self.config.negation_rate
            form = rng.choices(["adjective", "verb", "recommend"], weights=[0.6, 0.25, 0.15])[0]
            aspect = rng.choice(ASPECTS)
            if form == "adjective":  # "not" flips the adjective: "not bad" is positive
                adjective = rng.choice(GOOD_ADJECTIVES if good != negate else BAD_ADJECTIVES)
                words = ["the", aspect, "is"] + ["not"] * negate
                words += [rng.choice(INTENSIFIERS)] * (rng.random() < 0.3) + [adjective]
            elif form == "verb":
                verb = rng.choice(GOOD_VERBS if good != negate else BAD_VERBS)
                words = ["i"] + ["do", "not"] * negate + [verb, "the", aspect]
            else:
                words = ["i", "would"] + ["not"] * (not good) + ["recommend", "it"]
            sentences.append(" " + " ".join(words + ["."]))
        return "".join(sentences)


def encoding():
    """Bytes, then every word of the language as one token (" great", and prompt-initial "ann"),
    then EOS."""
    words = NAMES + [" " + w for w in NAMES + PRODUCTS + ASPECTS + GOOD_ADJECTIVES
                     + BAD_ADJECTIVES + INTENSIFIERS + GOOD_VERBS + BAD_VERBS + FUNCTION_WORDS]
    return byte_encoding(words, name="toyworld")


# -----------------------------------------------------------------------------
# the reward (E4) and the exact grammar check


def reward(prompts, responses):
    """The toy world's R: the sentiment of each response, a tensor (N,) in [-1, 1]."""
    return torch.tensor([lexicon_sentiment(r, POSITIVE, NEGATIVE) for r in responses])


def _is_sentence(w):
    if w[:1] == ["the"] and len(w) >= 4 and w[1] in ASPECTS and w[2] == "is":
        rest = w[3:]
        rest = rest[1:] if rest[:1] == ["not"] else rest
        rest = rest[1:] if rest[:1] and rest[0] in INTENSIFIERS else rest
        adjectives = (POSITIVE | NEGATIVE) - set(GOOD_VERBS + BAD_VERBS + ["recommend"])
        return len(rest) == 1 and rest[0] in adjectives
    if w[:2] == ["i", "would"]:
        return w[2:] in (["recommend", "it"], ["not", "recommend", "it"])
    if w[:1] == ["i"]:
        rest = w[3:] if w[1:3] == ["do", "not"] else w[1:]
        return len(rest) == 3 and rest[0] in GOOD_VERBS + BAD_VERBS and rest[1] == "the" \
            and rest[2] in ASPECTS
    return False


def is_grammatical(response):
    """Exactly: is `response` a sequence of sentences of the grammar, each a space-separated word
    sequence ending in " ."? (How many sentences a review has is a habit of the world, not a rule of
    its grammar.)"""
    if not response.startswith(" ") or "  " in response or not response.endswith(" ."):
        return False
    return all(_is_sentence(s.split(" ")) for s in response[1:-2].split(" . "))


# -----------------------------------------------------------------------------
# the base model, pretrained on the CPU and cached under out/


@dataclass
class PretrainConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 48
    documents: int = 40000  # sampled prompt + response documents to train on
    steps: int = 1200
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


def documents(world, n, rng):
    # the base model knows every product; V will not see test ones
    pairs = world.train_pairs + world.test_pairs
    return [(world.prompt(*pair), world.sample_response(*pair, rng)) for pair in rng.choices(pairs,
                                                                                             k=n)]


def pretrain(world, config, log=print):
    """Train a GPT-2-architecture model on the language: next-token loss on prompt + response + EOS.
    """
    torch.manual_seed(config.seed)
    enc = encoding()
    eot = enc.eot_token
    model = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=config.block_size,
                          n_layer=config.n_layer,
                          n_head=config.n_head, n_embd=config.n_embd, eos_token_ids=[eot]))
    rows = [enc.encode(p + r) + [eot] for p,
            r in documents(world, config.documents, random.Random(config.seed))]
    # -1: padding, no loss
    data = torch.full((len(rows), config.block_size + 1), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        data[i, :len(row)] = torch.tensor(row[:config.block_size + 1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01,
                                  betas=(0.9, 0.95))
    t0 = time.time()
    for step in range(config.steps):
        lr = config.lr * min(1.0,
                             (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = data[torch.randint(len(data), (config.batch_size,))]
        x, y = batch[:, :-1].clamp(min=0), batch[:, 1:]
        logits = model(x)  # (B, T, vocab)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == config.steps - 1:
            log(f"pretrain step {step:5d}/{config.steps} loss {loss.item():.3f} "
                f"({time.time() - t0:.0f}s)")
    return model.eval(), enc


def base_model(out_dir="out/toyworld", world_config=WorldConfig(),
               pretrain_config=PretrainConfig(), log=print):
    """The toy world's base model and tokenizer: loaded from out_dir when it was trained with these
    settings."""
    seed = pretrain_config.seed
    folder = os.path.join(out_dir, "base" if seed == 0 else f"base-seed{seed}")
    settings = json.loads(json.dumps({"world": asdict(world_config),
                                      "pretrain": asdict(pretrain_config)}))
    settings_path = os.path.join(folder, "settings.json")
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            if json.load(f) == settings:
                return from_pretrained(folder), load_tokenizer(folder)
    log(f"pretraining the base model into {folder} (once; later runs reuse it)")
    model, enc = pretrain(World(world_config), pretrain_config, log)
    save_pretrained(model, folder)
    save_tokenizer(enc, folder)
    # written last: a folder without it is retrained
    write_text_atomically(settings_path, json.dumps(settings))
    return model, enc


# The worlds a script can name with --model: the default one (reviews of 1-3 sentences, about 15
# tokens) and a long one (16-20 sentences, about 100 tokens), where the reward must be carried back
# over a long horizon. "toy@2" / "toy-long@2" is the same world with the base model pretrained from
# seed 2 (another base model).
VARIANTS = {
    "toy": ("out/toyworld", WorldConfig(), PretrainConfig()),
    "toy-long": ("out/toyworld-long",
                 WorldConfig(sentences=(16, 17, 18, 19, 20), sentence_weights=(1, 1, 1, 1, 1)),
                 PretrainConfig(block_size=160, batch_size=24)),
}


def is_variant(spec):
    return spec.split("@")[0] in VARIANTS


def load_variant(spec, log=print):
    """(model, tokenizer) of a toy world named like "toy", "toy-long" or "toy@3" (pretraining seed
    3)."""
    name, _, seed = spec.partition("@")
    if not seed.isdigit() and seed:
        raise ValueError(f"model {spec!r}: the pretraining seed after '@' must be a whole number, "
                         f"e.g. {name}@1")
    out_dir, world_config, pretrain_config = VARIANTS[name]
    return base_model(out_dir, world_config, replace(pretrain_config, seed=int(seed or 0)), log)
