"""
What RE-Control is applied to: a base model, prompts x, and a reward R(x, y) (docs/method.md, E4).

Every reward has one interface, reward(prompts, responses) -> tensor (N,), higher is better:
- "toy": the embedded toy world's sentiment (toyworld.py);
- "sentiment": an English sentiment lexicon with negation, so GPT-2 can be steered out of the box;
- "rm:<folder>": a reward model (GPT2ForSequenceClassification, LlamaForSequenceClassification or UltraRM weights)
  read through model.py, the paper's set-up; "rm:<folder>::ultrarm" lays the text out as UltraRM expects;
- "<module>:<function>": any function of that signature that Python can import.
"""

import gzip
import hashlib
import importlib
import json
import os

import torch

import toyworld
from checkpoints import from_pretrained, resolve_checkpoint
from formats import resolve_dtype
from model import left_pad
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
# models


def load_model(spec, dtype=None, device=None, log=print):
    """(model, tokenizer) for a toy world ("toy", "toy-long", "toy@seed"; toyworld.VARIANTS) or anything
    checkpoints.from_pretrained loads; in `dtype` (default: as stored) on `device` (default: cpu)."""
    if toyworld.is_variant(spec):
        model, enc = toyworld.load_variant(spec, log=log)
        return model.to(dtype=resolve_dtype(dtype), device=check_device(device)), enc
    model = from_pretrained(spec, dtype=dtype, device=check_device(device))
    return model, load_tokenizer(tokenizer_folder(spec))


def tokenizer_folder(spec):
    """Where a checkpoint's tokenizer files are: its folder, or the folder of a llama2.c .bin file."""
    path = resolve_checkpoint(spec)
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def check_device(device):
    """The torch.device that --device names (None: the default, cpu), refused when this machine has none."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device torch knows; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA devices here; "
                         "use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: the MPS backend is not available here; use --device cpu")
    return device


def named_tokens(enc, names):
    """Token ids of --eos: each a special token's text ("</s>", "<|eot_id|>") or an id."""
    ids = []
    for name in names:
        try:
            ids.append(int(name) if name.isdigit() else enc.encode_single_token(name))
        except KeyError:
            raise ValueError(f"--eos {name!r} is not one token of this tokenizer; name a special token such as '</s>', "
                             "or give its id") from None
    return ids


def check_task_flags(args):
    """--dtype and --device, checked before anything is loaded."""
    resolve_dtype(args.dtype)
    check_device(args.device)


def prompts_digest(prompts):
    """A short fingerprint of a list of prompts (SHA-256 of their JSON), recorded with what was made from them."""
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]


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


def read_lines(path):
    """The lines of a UTF-8 text file, gzip-compressed when its name ends in .gz; any problem named with the file."""
    if os.path.isdir(path):
        raise ValueError(f"prompt file {path} is a folder; pass a .txt, .jsonl or .jsonl.gz file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt file {path} does not exist (or use toy-train / toy-test)")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read().splitlines()
    except gzip.BadGzipFile:
        raise ValueError(f"{path} is not gzip-compressed, though its name ends in .gz; rename it or compress "
                         "it") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None


CHAT_TEMPLATES = {  # --chat: how an instruct model expects a user's turn, ending where the assistant speaks
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "vicuna": "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions. USER: {prompt} ASSISTANT:",
}


def load_prompts(path, chat=None):
    """Prompts from "toy-train" / "toy-test", a text file (one per line), JSONL with a "prompt" field, or
    Anthropic HH-RLHF .jsonl / .jsonl.gz files (records with "chosen" and "rejected" dialogues); each put in the
    chat template `chat` (CHAT_TEMPLATES) when given."""
    if chat is not None and chat not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {chat!r}; use one of {', '.join(CHAT_TEMPLATES)}")
    template = CHAT_TEMPLATES[chat] if chat else "{prompt}"
    if path in ("toy-train", "toy-test"):
        world = toyworld.World()
        prompts = world.train_prompts() if path == "toy-train" else world.test_prompts()
        return [template.format(prompt=p) for p in prompts]
    lines = read_lines(path)
    if path.removesuffix(".gz").endswith((".jsonl", ".json")):
        prompts = [prompt_of_record(line, f"{path}, line {n}") for n, line in enumerate(lines, 1) if line.strip()]
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts; write one prompt per line (or JSONL with a \"prompt\" field)")
    return [template.format(prompt=p) for p in prompts]


def prompt_of_record(line, where):
    """The prompt of one JSONL record: its "prompt" field, or the dialogue of HH-RLHF's "chosen" up to the answer."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
    if isinstance(record, dict) and "prompt" in record:
        prompt = record["prompt"]
    elif isinstance(record, dict) and isinstance(record.get("chosen"), str):
        try:
            prompt = hh_prompt(record["chosen"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    else:
        raise ValueError(f"{where}: expected a JSON object with a \"prompt\" field (or HH-RLHF's \"chosen\")")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: the prompt must be a non-empty string, got {prompt!r}")
    return prompt


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


RM_FORMATS = {  # rm:<folder>::<format>: the text a reward model reads
    "plain": "{prompt}{response}",  # HH-RLHF reward models: the prompt is already "\n\nHuman: ...\n\nAssistant:"
    "ultrarm": "Human: {prompt}\nAssistant: {response}",  # UltraRM
}


class RewardModel:
    """A sequence-classification model (or UltraRM's regression head) as R: its score of prompt + response, laid
    out as `template` says, read at the last token, in batches."""

    def __init__(self, folder, dtype=None, device=None, batch_size=16, template=RM_FORMATS["plain"]):
        self.model = from_pretrained(folder, dtype=dtype, device=device)
        if not self.model.config.n_labels:
            raise ValueError(f"{folder} is a language model, not a reward model; rm: needs a "
                             "GPT2ForSequenceClassification or LlamaForSequenceClassification checkpoint")
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
    """A reward function whose every answer is checked: one finite number per response, as a float tensor (N,).
    A reward that raises, or answers with the wrong shape or NaN, is an error that names it."""

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
            raise ValueError(f"reward {self.name!r} returned shape {tuple(scores.shape)} for {len(responses)} "
                             f"responses; it must return one number per response, shape ({len(responses)},)")
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"reward {self.name!r} returned {scores[bad[0]].item()} for {len(bad)} of "
                             f"{len(responses)} responses (e.g. {responses[bad[0]]!r}); it must return finite numbers")
        return scores


REWARDS = {"toy": toyworld.reward, "sentiment": english_sentiment}


def grammar_check(spec):
    """The exact fluency check that comes with a reward: the toy world's grammar for "toy", else None."""
    return toyworld.is_grammatical if spec == "toy" else None


def load_reward(spec, device=None):
    """The reward function named by `spec` (see the top of this file), its answers checked (CheckedReward)."""
    if spec in REWARDS:
        return CheckedReward(REWARDS[spec], spec)
    if spec.startswith("rm:"):
        folder, _, form = spec[3:].partition("::")
        if form and form not in RM_FORMATS:
            raise ValueError(f"reward {spec!r}: unknown format {form!r} after '::'; use one of {', '.join(RM_FORMATS)}")
        return CheckedReward(RewardModel(folder, device=device, template=RM_FORMATS[form or "plain"]), spec)
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
    raise ValueError(f"unknown reward {spec!r}; use one of {', '.join(REWARDS)}, rm:<reward model folder>, "
                     "or module:function")
