"""
Weights on disk: a model from a folder in any format formats.py reads (or a hub name), our own layout written,
and any file written atomically and never over another job's work.
"""

import json
import os
from dataclasses import asdict

import torch
from safetensors.torch import save_file

from formats import load_hf, load_llama2c, load_meta_llama, load_native, resolve_dtype
from model import GPT, rope_frequencies

# -----------------------------------------------------------------------------
# writing: atomically, and in our own layout


def write_atomically(path, write):
    """write(tmp) then rename over `path`: a crash leaves the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:  # a failed write (disk full, Ctrl-C) leaves no temporary file behind
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomically(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    write_atomically(path, write)


def as_json(x):
    """x as JSON would give it back (tuples become lists), so that recorded and current settings compare equal."""
    return json.loads(json.dumps(x))


def differences(recorded, current, prefix=""):
    """What differs between two (nested) settings dicts, as 'key: recorded -> current' phrases."""
    recorded, current = as_json(recorded), as_json(current)
    found = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key, "(not recorded)"), current.get(key, "(not recorded)")
        if isinstance(old, dict) and isinstance(new, dict):
            found += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            found.append(f"{prefix}{key}: {str(old)[:60]} -> {str(new)[:60]}")
    return found


def check_overwrite(path, made_by, read_made_by, overwrite):
    """Before a run writes `path`: a file that is there already is replaced only when it was made by the same job
    (read_made_by(path) records the same settings as made_by) or with --overwrite; else a ValueError says why.
    made_by None: only check that the file was made by this tool (before the job's settings are all known)."""
    if overwrite or not os.path.exists(path):
        return
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; name a file")
    try:
        recorded = read_made_by(path)
    except Exception:
        recorded = None
    if recorded is None:
        raise ValueError(f"{path} exists and does not record what made it (not written by this tool, or by an older "
                         "version); choose another path, or pass --overwrite to replace it")
    changed = differences(recorded, made_by) if made_by is not None else []
    if changed:
        raise ValueError(f"{path} was made with other settings ({'; '.join(changed[:4])}"
                         f"{'; ...' if len(changed) > 4 else ''}); choose another path, or pass --overwrite to "
                         "replace it")


def save_pretrained(model, folder):
    """Our own layout: gpt_config.json (the GPTConfig) and model.safetensors under our key names."""
    os.makedirs(folder, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings and not model.config.n_labels:
        state.pop("lm_head.weight")  # the same tensor as wte.weight
    write_atomically(os.path.join(folder, "model.safetensors"), lambda path: save_file(state, path))
    write_text_atomically(os.path.join(folder, "gpt_config.json"), json.dumps(asdict(model.config), indent=1))


# -----------------------------------------------------------------------------
# reading

def from_pretrained(name_or_dir, dtype=None, device=None):
    """A GPT in eval mode from a local folder (HF config.json, Meta params.json, or ours), a llama2.c .bin file, or
    a hub name."""
    folder = resolve_checkpoint(name_or_dir)
    if os.path.isfile(folder):
        config, weights = load_llama2c(folder)
    elif os.path.exists(os.path.join(folder, "gpt_config.json")):
        config, weights = load_native(folder)
    elif os.path.exists(os.path.join(folder, "params.json")):
        config, weights = load_meta_llama(folder)
    elif os.path.exists(os.path.join(folder, "config.json")):
        config, weights = load_hf(folder)
    else:
        raise FileNotFoundError(f"{folder} has no config.json (Hugging Face layout), params.json (Meta layout) "
                                "or gpt_config.json (ours); point from_pretrained at the folder with the weights")
    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        model = GPT(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_embeddings and not config.n_labels:
        expected.pop("lm_head.weight")
    missing = [k for k in expected if k not in weights]
    if missing:
        raise KeyError(f"{folder}: no weights for {missing[0]} ({weights.describe(missing[0])})"
                       + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    weights.check_all_used()
    dtype = resolve_dtype(dtype) or weights.get("wte.weight").dtype  # default: as stored on disk
    state = {}
    for key, shape in expected.items():
        tensor = weights.get(key)
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{folder}: {weights.describe(key)} has shape {tuple(tensor.shape)}, "
                             f"but the config asks for {tuple(shape)}")
        state[key] = tensor.to(dtype=dtype, device=device)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings and not config.n_labels:
        model.lm_head.weight = model.wte.weight
    if config.positions == "rope":
        model.inv_freq = rope_frequencies(config).to(device)
    return model.eval()


def resolve_checkpoint(name_or_dir):
    """A local folder (or llama2.c .bin file) as it is; a hub name through the Hugging Face cache (downloaded when
    online)."""
    if os.path.isdir(name_or_dir) or (os.path.isfile(name_or_dir) and name_or_dir.endswith(".bin")):
        return name_or_dir
    if os.path.exists(name_or_dir) or name_or_dir.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name_or_dir} is not a folder (nor a llama2.c .bin file); pass the folder that holds "
                                "config.json or params.json and the weights")
    hint = ("Pass a local folder instead: one with config.json and model.safetensors (Hugging Face layout) "
            "or params.json and consolidated.00.pth (Meta layout).")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{name_or_dir!r} is not a local folder, and huggingface_hub is not installed "
                                f"to fetch it from the hub. {hint}") from None
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "original/tokenizer.model", "merges.txt", "vocab.json"]
    try:  # a copy already in the cache needs no network
        return snapshot_download(name_or_dir, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    try:
        return snapshot_download(name_or_dir, allow_patterns=patterns)
    except Exception as e:
        raise FileNotFoundError(f"{name_or_dir!r} is not a local folder and could not be fetched from the "
                                f"Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})."
                                f" {hint}") from None
