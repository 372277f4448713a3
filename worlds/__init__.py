"""
The worlds a script can name, and the way from a name to a model, prompts and a reward.

Embedded worlds, built on the CPU without downloads: "toy" (short product reviews, worlds/toy.py), "toy-long"
(reviews of ~100 tokens), and either with "@SEED" for a base model pretrained from another seed. Their prompts
are "toy-train" / "toy-test" and their reward "toy". Any other name is a real checkpoint, prompt file or reward,
read by plumbing/.
"""

from plumbing import checkpoints, prompts, rewards
from plumbing.formats import resolve_dtype
from worlds import toy

PROMPT_SETS = {"toy-train": lambda: toy.World().train_prompts(), "toy-test": lambda: toy.World().test_prompts()}
REWARDS = {"toy": toy.reward}
GRAMMARS = {"toy": toy.is_grammatical}  # the exact fluency check that comes with a reward


def load_model(spec, dtype=None, device=None, log=print):
    """(model, tokenizer) of an embedded world's base model ("toy", "toy-long@2"; pretrained once and cached
    under out/) or of any checkpoint from_pretrained reads; in `dtype` (default: as stored) on `device`."""
    if toy.is_variant(spec):
        model, enc = toy.load_variant(spec, log=log)
        return model.to(dtype=resolve_dtype(dtype), device=checkpoints.check_device(device)), enc
    return checkpoints.load_model(spec, dtype=dtype, device=device)


def load_prompts(spec, chat=None):
    """An embedded prompt set ("toy-train", "toy-test") or a prompt file; each put in the chat template `chat`."""
    if spec in PROMPT_SETS:
        return prompts.in_chat_template(PROMPT_SETS[spec](), chat)
    prompts.in_chat_template([], chat)  # an unknown template is refused before the file is read
    return prompts.load_prompts(spec, chat)


def load_reward(spec, device=None):
    """An embedded world's reward ("toy") or any reward plumbing/rewards.py reads, its answers checked."""
    return rewards.load_reward(spec, device=device, named=REWARDS)


def grammar_check(reward_spec):
    """The exact grammar that comes with an embedded world's reward; None for other rewards."""
    return GRAMMARS.get(reward_spec)
