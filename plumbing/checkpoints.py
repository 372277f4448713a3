"""
Weights on disk: a model from a folder in any format formats.py reads (or a hub name), our own
layout written, and value checkpoints that carry their architecture and the base model and reward
they were trained for.
"""

import json
import os
from dataclasses import asdict

import torch
from safetensors.torch import save_file

from model import GPT, rope_frequencies
from plumbing.files import check_zip, write_atomically, write_text_atomically
from plumbing.formats import load_hf, load_llama2c, load_meta_llama, load_native, resolve_dtype
from plumbing.tokenizer import load_tokenizer
from value import ValueConfig, ValueFunction

# -----------------------------------------------------------------------------
# writing our own layout


def save_pretrained(model, folder):
    """Our own layout: gpt_config.json (the GPTConfig) and model.safetensors under our key names."""
    os.makedirs(folder, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings and not model.config.n_labels:
        state.pop("lm_head.weight")  # the same tensor as wte.weight
    write_atomically(os.path.join(folder, "model.safetensors"), lambda path: save_file(state, path))
    write_text_atomically(os.path.join(folder, "gpt_config.json"),
                          json.dumps(asdict(model.config), indent=1))


# -----------------------------------------------------------------------------
# reading

def from_pretrained(name_or_dir, dtype=None, device=None):
    """A GPT in eval mode from a local folder (HF config.json, Meta params.json, or ours), a
    llama2.c .bin file, or a hub name."""
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
        raise FileNotFoundError(f"{folder} has no config.json (Hugging Face layout), params.json "
                                "(Meta layout) or gpt_config.json (ours); point from_pretrained "
                                "at the folder with the weights")
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


def load_model(path, dtype=None, device=None, tokenizer=None):
    """(model, tokenizer) of a checkpoint that from_pretrained reads, in `dtype` (default: as
    stored) on `device` (default: cpu); the tokenizer from `tokenizer` (a folder or a llama2.c .bin
    file), else beside the weights. A tokenizer with more tokens than the model's vocabulary is
    refused."""
    model = from_pretrained(path, dtype=dtype, device=check_device(device))
    enc = load_tokenizer(tokenizer or tokenizer_folder(path))
    if enc.n_vocab > model.config.vocab_size:
        raise ValueError(f"the tokenizer {tokenizer or tokenizer_folder(path)} has {enc.n_vocab} "
                         f"tokens, but the model {path} has a vocabulary of "
                         f"{model.config.vocab_size}: they do not belong together; name the "
                         "model's own tokenizer with --tokenizer PATH")
    return model, enc


def tokenizer_folder(spec):
    """Where a checkpoint's tokenizer files are: its folder, or the folder of a llama2.c .bin file.
    """
    path = resolve_checkpoint(spec)
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def check_dtype_and_device(dtype, device):
    """--dtype and --device, checked before anything is loaded."""
    resolve_dtype(dtype)
    check_device(device)


def check_device(device):
    """The torch.device that --device names (None: the default, cpu), refused when this machine has
    none."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device torch knows; use cpu, cuda or "
                         "cuda:N") from None
    missing = not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    if device.type == "cuda" and missing:
        raise ValueError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA devices "
                         "here; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: the MPS backend is not available here; use --device cpu")
    return device


def resolve_checkpoint(name_or_dir):
    """A local folder (or llama2.c .bin file) as it is; a hub name through the Hugging Face cache
    (downloaded when online)."""
    if os.path.isdir(name_or_dir) or (os.path.isfile(name_or_dir) and name_or_dir.endswith(".bin")):
        return name_or_dir
    if os.path.exists(name_or_dir) or name_or_dir.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name_or_dir} is not a folder (nor a llama2.c .bin file); pass "
                                "the folder that holds config.json or params.json and the weights")
    hint = ("Pass a local folder instead: one with config.json and model.safetensors (Hugging "
            "Face layout) or params.json and consolidated.00.pth (Meta layout).")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{name_or_dir!r} is not a local folder, and huggingface_hub is "
                                f"not installed to fetch it from the hub. {hint}") from None
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "original/tokenizer.model",
                "merges.txt", "vocab.json"]
    try:  # a copy already in the cache needs no network
        return snapshot_download(name_or_dir, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    try:
        return snapshot_download(name_or_dir, allow_patterns=patterns)
    except Exception as e:
        raise FileNotFoundError(f"{name_or_dir!r} is not a local folder and could not be fetched "
                                f"from the Hugging Face hub ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}). {hint}") from None


# -----------------------------------------------------------------------------
# value checkpoints: V with its architecture, the base model it reads and the reward it predicts


def model_fingerprint(model):
    """A few numbers of the base model's weights, enough to tell one model from another of the same
    width."""
    w = model.wte.weight
    return torch.cat([w[:4, :8].flatten(), model.norm_f.weight[:8]]).float().tolist()


def value_provenance(base_model_id, model, reward_name, train_args=None):
    """What a value checkpoint records of the job that made it: the base model (its name and a
    fingerprint of its weights), the reward, and the training settings. A rerun of the same job may
    replace it; nothing else."""
    return {"base_model": base_model_id, "base_fingerprint": model_fingerprint(model),
            "reward": reward_name, "train_args": train_args or {}}


def read_value_provenance(path):
    """value_provenance of the value checkpoint at `path` (an error if it is not one)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return {key: checkpoint[key] for key in ("base_model", "base_fingerprint", "reward",
                                             "train_args")}


def save_value(path, value, provenance, metrics=None, control=None):
    """Save V_phi with its architecture and `provenance` (value_provenance), atomically; `control`:
    the settings of E7 calibrated for it (step_size, n_steps, target, and the curve they came from).
    """
    checkpoint = {"config": asdict(value.config), "state_dict": value.state_dict(), **provenance,
                  "metrics": metrics or {}, "control": control or {}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomically(path, lambda tmp: torch.save(checkpoint, tmp))
    return checkpoint


def load_value(path, model=None, model_id=None, reward=None):
    """(V_phi in eval mode with frozen weights, checkpoint dict). With `model` (and `reward`), check
    that it was trained for that model's states (and to predict that reward), and put V on the
    model's device."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"value checkpoint {path} does not exist; train one with "
                                "train_value.py")
    check_zip(path, "value checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        config = ValueConfig(**checkpoint["config"])
    except Exception as e:
        raise ValueError(f"{path} is not a value checkpoint written by train_value.py "
                         f"({type(e).__name__}: {e})") from None
    if model is not None:
        check_value_fits(path, checkpoint, config, model, model_id)
    if reward is not None and reward != checkpoint["reward"]:
        raise ValueError(f"value checkpoint {path} predicts the reward {checkpoint['reward']!r}, "
                         f"not {reward!r}; pass --reward {checkpoint['reward']}, or train a value "
                         f"function for {reward!r}")
    value = ValueFunction(config)
    value.load_state_dict(checkpoint["state_dict"])
    value.requires_grad_(False)  # frozen at test time: E7 differentiates with respect to u only
    # on the device of the states it reads (in fp32 whatever the model's dtype)
    if model is not None:
        value.to(model.wte.weight.device)
    return value.eval(), checkpoint


def check_value_fits(path, checkpoint, config, model, model_id):
    """A value checkpoint reads the states of the model it was trained for, and of no other."""
    trained_for = f"{checkpoint['base_model']!r} (reward {checkpoint['reward']!r})"
    retrain = "train a value function for this model with train_value.py"
    if model.config.n_embd != config.n_embd:
        raise ValueError(f"value checkpoint {path} reads states of width {config.n_embd}, trained "
                         f"for {trained_for}, but {model_id or 'this model'} has width "
                         f"{model.config.n_embd}; {retrain}")
    ours = torch.tensor(model_fingerprint(model))
    if not torch.allclose(ours, torch.tensor(checkpoint["base_fingerprint"]), atol=1e-2, rtol=1e-2):
        raise ValueError(f"value checkpoint {path} was trained for {trained_for}, whose weights "
                         f"differ from {model_id or 'this model'}; {retrain}")
