"""
Weights on disk: reading checkpoints of other codebases into our GPT, writing our own, and writing any file
atomically.

Three layouts are read, each mapped key by key onto model.py's names:
- Hugging Face folders (config.json + model.safetensors, sharded safetensors, or pytorch_model.bin): GPT-2 and
  Llama, causal LM or sequence classification (a reward model);
- Meta's Llama folders (params.json + consolidated.NN.pth model-parallel shards);
- ours (gpt_config.json + model.safetensors), written by save_pretrained.
Nothing is unpickled: .bin/.pth files are read with torch.load(weights_only=True).
"""

import glob
import json
import os
import zipfile
from dataclasses import asdict

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model import GPT, GPTConfig, LLAMA31_ROPE, LLAMA_LAYOUT, rope_frequencies

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
                         f"{'; ...' if len(changed) > 4 else ''}); choose another path, or pass --overwrite to replace it")


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
    """A GPT in eval mode from a local folder (HF config.json, Meta params.json, or ours) or a hub name."""
    folder = resolve_checkpoint(name_or_dir)
    if os.path.exists(os.path.join(folder, "gpt_config.json")):
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


SUPPORTED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in SUPPORTED_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in SUPPORTED_DTYPES:
        return SUPPORTED_DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(SUPPORTED_DTYPES)}")


def resolve_checkpoint(name_or_dir):
    """A local folder as it is; a hub name through the Hugging Face cache (downloaded when online)."""
    if os.path.isdir(name_or_dir):
        return name_or_dir
    if os.path.exists(name_or_dir) or name_or_dir.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name_or_dir} is not a folder; pass the folder that holds config.json "
                                "or params.json and the weights")
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


class Weights:
    """Lazily read tensors of a checkpoint under our key names; remembers which file and key each comes from."""

    def __init__(self, folder):
        self.folder = folder
        self.sources = {}  # our key -> (list of (file, key) it is built from, function that builds it)
        self.files = {}  # file -> {key: loader} for every tensor stored there
        self.used = set()

    def add_file(self, path):
        name = os.path.basename(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing (the checkpoint's index or layout names it)")
        try:
            if path.endswith(".safetensors"):
                handle = safe_open(path, framework="pt")
                self.files[name] = {k: (lambda k=k, h=handle: h.get_tensor(k)) for k in handle.keys()}
            else:
                # zip files (torch >= 1.6) are mapped, not read; the legacy format is read whole. No unpickling of code
                data = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
                if "state_dict" in data and isinstance(data["state_dict"], dict):
                    data = data["state_dict"]
                self.files[name] = {k: (lambda t=t: t) for k, t in data.items() if torch.is_tensor(t)}
        except OSError:  # missing or unreadable file: its own message is clear
            raise
        except Exception as e:
            raise ValueError(f"{path} could not be read: it is truncated or corrupt ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); download it again") from None

    def raw(self, file, key):
        self.used.add((file, key))
        tensor = self.files[file][key]()
        if tensor.dtype not in SUPPORTED_DTYPES.values():
            raise ValueError(f"{os.path.join(self.folder, file)}: {key} is stored as {tensor.dtype}; "
                             f"only {', '.join(SUPPORTED_DTYPES)} weights are supported (no quantized checkpoints)")
        return tensor

    def find(self, key):
        """The file that stores `key`, or None."""
        return next((f for f, keys in self.files.items() if key in keys), None)

    def map(self, ours, theirs, build=lambda *t: t[0]):
        """Our key `ours` is built by `build` from the stored tensors `theirs` ([(file, key)] or [key])."""
        parts = [(p if isinstance(p, tuple) else (self.find(p), p)) for p in theirs]
        self.sources[ours] = (parts, build)

    def __contains__(self, ours):
        return ours in self.sources and all(f is not None for f, _ in self.sources[ours][0])

    def describe(self, ours):
        parts = self.sources.get(ours, ([], None))[0]
        missing = [k for f, k in parts if f is None]
        if missing:
            return f"key {', '.join(missing)} is in none of {', '.join(sorted(self.files)) or 'the files'}"
        return ", ".join(f"{k} in {f}" for f, k in parts) or "no source key known"

    def get(self, ours):
        parts, build = self.sources[ours]
        return build(*(self.raw(f, k) for f, k in parts))

    def ignore(self, predicate):
        for file, keys in self.files.items():
            self.used.update((file, k) for k in keys if predicate(k))

    def check_all_used(self):
        referenced = {p for parts, _ in self.sources.values() for p in parts}
        unexpected = sorted(f"{k} in {f}" for f, keys in self.files.items() for k in keys
                            if (f, k) not in referenced and (f, k) not in self.used)
        if unexpected:
            shown = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
            raise KeyError(f"{self.folder}: unexpected weights {shown}; the config.json does not describe "
                           "this checkpoint (wrong model_type, n_layer or head?)")


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def load_native(folder):
    config = GPTConfig(**read_json(os.path.join(folder, "gpt_config.json")))
    weights = Weights(folder)
    weights.add_file(os.path.join(folder, "model.safetensors"))
    for key in weights.files["model.safetensors"]:
        weights.map(key, [key])
    return config, weights


def load_hf(folder):
    """A Hugging Face folder: GPT-2 or Llama, causal LM or sequence classification; safetensors or .bin."""
    hf = read_json(os.path.join(folder, "config.json"))
    model_type = hf.get("model_type")
    arch = (hf.get("architectures") or [""])[0]
    n_labels = (len(hf.get("id2label", {})) or hf.get("num_labels", 2)) if "SequenceClassification" in arch else 0
    eos = hf.get("eos_token_id")
    common = dict(vocab_size=hf["vocab_size"], n_labels=n_labels, pad_token_id=hf.get("pad_token_id"),
                  eos_token_ids=[] if eos is None else eos if isinstance(eos, list) else [eos])
    if model_type == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise ValueError(f"{folder}/config.json: scale_attn_by_inverse_layer_idx and reorder_and_upcast_attn "
                             "are not supported")
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{folder}/config.json: activation_function {hf['activation_function']!r} is not "
                             "supported (GPT-2 uses gelu_new)")
        config = GPTConfig(block_size=hf["n_positions"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                           n_embd=hf["n_embd"], intermediate_size=hf.get("n_inner") or 0,
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                           tie_embeddings=hf.get("tie_word_embeddings", True), **common)
    elif model_type == "llama":
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers 5 / 4 spellings
        config = GPTConfig(block_size=hf.get("max_position_embeddings", 2048), n_layer=hf["num_hidden_layers"],
                           n_head=hf["num_attention_heads"], n_kv_head=hf.get("num_key_value_heads") or 0,
                           n_embd=hf["hidden_size"], head_dim=hf.get("head_dim") or 0,
                           intermediate_size=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                           rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                           rope_scaling=rope if rope.get("rope_type", rope.get("type")) not in (None, "default")
                           else None, tie_embeddings=hf.get("tie_word_embeddings", False), **LLAMA_LAYOUT, **common)
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError(f"{folder}/config.json: attention_bias / mlp_bias are not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{folder}/config.json: hidden_act {hf['hidden_act']!r} is not supported (Llama uses silu)")
    else:
        raise ValueError(f"{folder}/config.json: model_type {model_type!r} is not supported; "
                         "this model file loads 'gpt2' and 'llama'")

    weights = Weights(folder)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        for file in sorted(set(read_json(index)["weight_map"].values())):
            weights.add_file(os.path.join(folder, file))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        weights.add_file(os.path.join(folder, "model.safetensors"))
    elif os.path.exists(os.path.join(folder, "pytorch_model.bin")):
        weights.add_file(os.path.join(folder, "pytorch_model.bin"))
    else:
        raise FileNotFoundError(f"{folder} has no weights: expected model.safetensors, "
                                "model.safetensors.index.json (sharded) or pytorch_model.bin")
    if model_type == "gpt2":
        map_gpt2(weights, config)
    else:
        map_llama_hf(weights, config)
    if n_labels:
        weights.map("score.weight", ["score.weight"])
    return config, weights


def map_gpt2(weights, config):
    # the legacy pytorch_model.bin has no "transformer." prefix and carries causal-mask buffers
    prefix = "transformer." if weights.find("transformer.wte.weight") else ""
    weights.ignore(lambda k: k.endswith((".attn.bias", ".attn.masked_bias")))
    if config.tie_embeddings:  # some files store the tied head again
        weights.ignore(lambda k: k == "lm_head.weight")
    transpose = lambda w: w.t()  # GPT-2's Conv1D stores (in, out); nn.Linear wants (out, in)
    weights.map("wte.weight", [prefix + "wte.weight"])
    weights.map("wpe.weight", [prefix + "wpe.weight"])
    for i in range(config.n_layer):
        h, b = f"{prefix}h.{i}.", f"blocks.{i}."
        for ours, theirs in [("norm1", "ln_1"), ("norm2", "ln_2")]:
            for p in ("weight", "bias"):
                weights.map(f"{b}{ours}.{p}", [f"{h}{theirs}.{p}"])
        for ours, theirs in [("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                             ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")]:
            weights.map(f"{b}{ours}.weight", [f"{h}{theirs}.weight"], transpose)
            weights.map(f"{b}{ours}.bias", [f"{h}{theirs}.bias"])
    for p in ("weight", "bias"):
        weights.map(f"norm_f.{p}", [f"{prefix}ln_f.{p}"])
    if not config.tie_embeddings and not config.n_labels:
        weights.map("lm_head.weight", ["lm_head.weight"])


def map_llama_hf(weights, config):
    weights.ignore(lambda k: k.endswith("rotary_emb.inv_freq"))
    cat = lambda *t: torch.cat(t, dim=0)
    weights.map("wte.weight", ["model.embed_tokens.weight"])
    for i in range(config.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        weights.map(f"{b}norm1.weight", [h + "input_layernorm.weight"])
        weights.map(f"{b}norm2.weight", [h + "post_attention_layernorm.weight"])
        weights.map(f"{b}attn.qkv.weight", [h + f"self_attn.{x}_proj.weight" for x in "qkv"], cat)
        weights.map(f"{b}attn.proj.weight", [h + "self_attn.o_proj.weight"])
        weights.map(f"{b}mlp.fc.weight", [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"], cat)
        weights.map(f"{b}mlp.proj.weight", [h + "mlp.down_proj.weight"])
    weights.map("norm_f.weight", ["model.norm.weight"])
    if config.tie_embeddings:
        weights.ignore(lambda k: k == "lm_head.weight")
    elif not config.n_labels:
        weights.map("lm_head.weight", ["lm_head.weight"])


def meta_to_halves(w, n_heads):
    """Meta's RoPE rotates interleaved pairs (0,1),(2,3)...; ours rotates halves (i, i+hs/2): permute q/k rows."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def load_meta_llama(folder):
    """A Meta folder: params.json and consolidated.NN.pth model-parallel shards."""
    params = read_json(os.path.join(folder, "params.json"))
    shards = sorted(glob.glob(os.path.join(folder, "consolidated.*.pth")))
    if not shards:
        raise FileNotFoundError(f"{folder} has params.json but no consolidated.NN.pth weight files")
    weights = Weights(folder)
    for path in shards:
        weights.add_file(path)
    files = [os.path.basename(p) for p in shards]
    first = weights.files[files[0]]
    for key in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight"):
        if key not in first:
            raise KeyError(f"{shards[0]}: key {key} is missing; this is not a Meta Llama checkpoint")
    n_layer, n_head = params["n_layers"], params["n_heads"]
    n_kv_head = params.get("n_kv_heads") or n_head
    n_embd = params["dim"]
    # Llama 2 splits the embedding over its width (dim 1), Llama 3 over the vocabulary (dim 0)
    emb_rows, emb_cols = first["tok_embeddings.weight"]().shape
    emb_split = 0 if emb_cols == n_embd else 1
    vocab = emb_rows * (len(files) if emb_split == 0 else 1)
    intermediate = first["layers.0.feed_forward.w1.weight"]().shape[0] * len(files)
    scaling = None
    if params.get("use_scaled_rope"):  # Llama 3.1 and 3.2
        scaling = dict(LLAMA31_ROPE, factor=params.get("rope_scaling_factor", 8.0))
    config = GPTConfig(block_size=params.get("max_seq_len", 8192 if scaling is None else 131072),
                       vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd,
                       intermediate_size=intermediate, norm_eps=params.get("norm_eps", 1e-5),
                       rope_theta=params.get("rope_theta", 10000.0), rope_scaling=scaling,
                       tie_embeddings=False, **LLAMA_LAYOUT)

    def sharded(ours, key, dim):
        # model-parallel shards split column-parallel weights on dim 0, row-parallel ones on dim 1;
        # dim None: replicated on every shard (the norms), read from the first
        if dim is None:
            weights.map(ours, [(files[0], key)])
        else:
            weights.map(ours, [(f, key) for f in files], lambda *t: torch.cat(t, dim=dim))

    sharded("wte.weight", "tok_embeddings.weight", emb_split)
    for i in range(n_layer):
        h, b = f"layers.{i}.", f"blocks.{i}."
        sharded(f"{b}norm1.weight", h + "attention_norm.weight", None)
        sharded(f"{b}norm2.weight", h + "ffn_norm.weight", None)
        q, k, v = ([(f, f"{h}attention.{x}.weight") for f in files] for x in ("wq", "wk", "wv"))
        s = len(files)
        weights.map(f"{b}attn.qkv.weight", q + k + v, lambda *t, s=s: torch.cat([
            meta_to_halves(torch.cat(t[:s]), n_head), meta_to_halves(torch.cat(t[s:2 * s]), n_kv_head),
            torch.cat(t[2 * s:])]))
        sharded(f"{b}attn.proj.weight", h + "attention.wo.weight", 1)
        w1, w3 = ([(f, f"{h}feed_forward.{x}.weight") for f in files] for x in ("w1", "w3"))
        weights.map(f"{b}mlp.fc.weight", w1 + w3, lambda *t, s=s: torch.cat([torch.cat(t[:s]), torch.cat(t[s:])]))
        sharded(f"{b}mlp.proj.weight", h + "feed_forward.w2.weight", 1)
    sharded("norm_f.weight", "norm.weight", None)
    sharded("lm_head.weight", "output.weight", 0)
    weights.ignore(lambda k: k == "rope.freqs")
    if len(files) > 1:  # norms are replicated on every shard; only the first copy is read
        for f in files[1:]:
            weights.used.update((f, k) for k in weights.files[f] if k.endswith("norm.weight"))
    return config, weights
