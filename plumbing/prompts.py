"""
Prompts x: a text file (one per line), JSONL with a "prompt" field, or Anthropic HH-RLHF dialogues,
each optionally put in an instruct model's chat template; and the fingerprint recorded with what is
made from them.
"""

import gzip
import hashlib
import json
import os


def prompts_digest(prompts):
    """A short fingerprint of a list of prompts (SHA-256 of their JSON), recorded with what was made
    from them."""
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]


HH_ASSISTANT = "\n\nAssistant:"


def hh_prompt(dialogue):
    """Anthropic HH-RLHF: the prompt is the dialogue up to and including its last 'Assistant:' turn
    marker."""
    cut = dialogue.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError("an HH-RLHF dialogue has no '\\n\\nAssistant:' turn")
    return dialogue[:cut + len(HH_ASSISTANT)]


def read_lines(path):
    """The lines of a UTF-8 text file, gzip-compressed when its name ends in .gz; any problem named
    with the file."""
    if os.path.isdir(path):
        raise ValueError(f"prompt file {path} is a folder; pass a .txt, .jsonl or .jsonl.gz file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt file {path} does not exist (or name an embedded prompt "
                                "set such as toy-train)")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read().splitlines()
    except gzip.BadGzipFile:
        raise ValueError(f"{path} is not gzip-compressed, though its name ends in .gz; rename it "
                         "or compress it") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None


# --chat: how an instruct model expects a user's turn, ending where the assistant speaks
CHAT_TEMPLATES = {
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "vicuna": "A chat between a curious user and an artificial intelligence assistant. The "
              "assistant gives helpful, detailed, and polite answers to the user's questions. "
              "USER: {prompt} ASSISTANT:",
}


def load_prompts(path, chat=None):
    """Prompts from a text file (one per line), JSONL with a "prompt" field, or Anthropic HH-RLHF
    .jsonl / .jsonl.gz files (records with "chosen" and "rejected" dialogues); each put in the chat
    template `chat`."""
    lines = read_lines(path)
    if path.removesuffix(".gz").endswith((".jsonl", ".json")):
        prompts = [prompt_of_record(line, f"{path}, line {n}") for n,
                   line in enumerate(lines, 1) if line.strip()]
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts; write one prompt per line (or JSONL with a "
                         "\"prompt\" field)")
    return in_chat_template(prompts, chat)


def in_chat_template(prompts, chat=None):
    """The prompts laid out as the instruct model `chat` (CHAT_TEMPLATES) expects; as they are for
    None."""
    if chat is not None and chat not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {chat!r}; use one of {', '.join(CHAT_TEMPLATES)}")
    return [CHAT_TEMPLATES[chat].format(prompt=p) for p in prompts] if chat else list(prompts)


def prompt_of_record(line, where):
    """The prompt of one JSONL record: its "prompt" field, or the dialogue of HH-RLHF's "chosen" up
    to the answer."""
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
        raise ValueError(f"{where}: expected a JSON object with a \"prompt\" field (or HH-RLHF's "
                         "\"chosen\")")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: the prompt must be a non-empty string, got {prompt!r}")
    return prompt


