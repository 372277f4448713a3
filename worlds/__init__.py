"""
The worlds a script can name, and the way from a name to a model, prompts and a reward.

Embedded worlds, built on the CPU without downloads:
- "toy" (short product reviews, worlds/toy.py), "toy-long" (reviews of ~100 tokens): prompts
  "toy-train" / "toy-test", reward "toy" (a lexicon);
- "verdict" (worlds/verdict.py, docs/verdict_world.md): prompts "verdict-train" / "verdict-test",
  reward "verdict-rm" (a learned reward model, built by `python -m worlds.verdict_rm`), judge
  "verdict-judge".
Each base model also with "@SEED", pretrained from another seed (its reward model:
"verdict-rm@SEED"). Any other name is a real checkpoint, prompt file or reward, read by plumbing/.
"""

import os

from plumbing import checkpoints, prompts, rewards
from plumbing.formats import resolve_dtype
from worlds import toy, verdict

PROMPT_SETS = {"toy-train": lambda: toy.World().train_prompts(),
               "toy-test": lambda: toy.World().test_prompts(),
               "verdict-train": lambda: verdict.prompts("train"),
               "verdict-test": lambda: verdict.prompts("test")}
REWARDS = {"toy": toy.reward, "verdict-judge": verdict.judge}
# the exact fluency check of a reward
GRAMMARS = {"toy": toy.is_grammatical, "verdict-rm": toy.is_grammatical,
            "verdict-judge": toy.is_grammatical}
JUDGES = {"verdict-rm": verdict.judge}  # the rule that decides quality apart from a learned reward


def load_model(spec, dtype=None, device=None, log=print, tokenizer=None):
    """(model, tokenizer) of an embedded world's base model ("toy", "toy-long@2"; pretrained once
    and cached under out/) or of any checkpoint from_pretrained reads (its tokenizer: `tokenizer`,
    else the one beside it); in `dtype` (default: as stored) on `device`."""
    if toy.is_variant(spec) or spec.split("@")[0] == "verdict":
        load = toy.load_variant if toy.is_variant(spec) else verdict.base_model
        model, enc = load(spec, log)
        return model.to(dtype=resolve_dtype(dtype), device=checkpoints.check_device(device)), enc
    return checkpoints.load_model(spec, dtype=dtype, device=device, tokenizer=tokenizer)


def load_prompts(spec, chat=None):
    """An embedded prompt set ("toy-train", "toy-test") or a prompt file; each put in the chat
    template `chat`."""
    if spec in PROMPT_SETS:
        return prompts.in_chat_template(PROMPT_SETS[spec](), chat)
    prompts.in_chat_template([], chat)  # an unknown template is refused before the file is read
    return prompts.load_prompts(spec, chat)


def load_reward(spec, device=None):
    """An embedded world's reward ("toy", "verdict-rm@1") or any reward plumbing/rewards.py reads,
    its answers checked."""
    name, _, seed = spec.partition("@")
    if name == "verdict-rm":
        folder = verdict.reward_model_folder(int(seed or 0))
        if not os.path.exists(os.path.join(folder, "settings.json")):
            raise FileNotFoundError(f"the verdict world's reward model {folder} is not built yet; "
                                    "build it with `python -m worlds.verdict_rm --seed "
                                    f"{seed or 0}` (compare.py --world verdict builds it)")
        return rewards.CheckedReward(rewards.RewardModel(folder, device=device), spec)
    return rewards.load_reward(spec, device=device, named=REWARDS)


def grammar_check(reward_spec):
    """The exact grammar that comes with an embedded world's reward; None for other rewards."""
    return GRAMMARS.get(reward_spec.split("@")[0])


def judge_of(reward_spec):
    """The judge that decides quality apart from a learned reward (the verdict world's rule); None
    for others."""
    return JUDGES.get(reward_spec.split("@")[0])
