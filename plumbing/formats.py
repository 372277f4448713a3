"""
Other codebases' checkpoints, read into model.py's names: each format's config and the map from its
keys to ours.

- Hugging Face folders (config.json + model.safetensors, sharded safetensors, or
  pytorch_model.bin): GPT-2, Llama and Falcon, causal LM or sequence classification (a reward
  model);
- Meta's Llama folders (params.json + consolidated.NN.pth model-parallel shards);
- llama2.c's model.bin files (versions 0, 1 and 2), e.g. the TinyStories models;
- ours (gpt_config.json + model.safetensors), written by checkpoints.save_pretrained.
Each loader returns (GPTConfig, Weights): a lazy table of our key -> the stored tensors it is built
from. Nothing is unpickled: .bin/.pth files are read with torch.load(weights_only=True).
"""

import glob
import math
import os
import struct
import zipfile

import torch
from safetensors import safe_open

from model import GPTConfig, LLAMA31_ROPE, LLAMA_LAYOUT
from plumbing.cli import require
from plumbing.files import read_json

SUPPORTED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in SUPPORTED_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in SUPPORTED_DTYPES:
        return SUPPORTED_DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(SUPPORTED_DTYPES)}")



class Weights:
    """Lazily read tensors of a checkpoint under our key names; remembers which file and key each
    comes from."""

    def __init__(self, folder):
        self.folder = folder
        # our key -> (list of (file, key) it is built from, function that builds it)
        self.sources = {}
        self.files = {}  # file -> {key: loader} for every tensor stored there
        self.used = set()

    def add_file(self, path):
        name = os.path.basename(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing (the checkpoint's index or layout names "
                                    "it)")
        try:
            if path.endswith(".safetensors"):
                handle = safe_open(path, framework="pt")
                self.files[name] = {k: (lambda k=k,
                                        h=handle: h.get_tensor(k)) for k in handle.keys()}
            else:
                # zip files (torch >= 1.6) are mapped, not read; the legacy format is read whole. No
                # unpickling of code
                data = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path),
                                  weights_only=True)
                if "state_dict" in data and isinstance(data["state_dict"], dict):
                    data = data["state_dict"]
                self.files[name] = {k: (lambda t=t: t) for k,
                                    t in data.items() if torch.is_tensor(t)}
        except OSError:  # missing or unreadable file: its own message is clear
            raise
        except Exception as e:
            raise ValueError(f"{path} could not be read: it is truncated or corrupt "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                             "download it again") from None

    def raw(self, file, key):
        self.used.add((file, key))
        tensor = self.files[file][key]()
        if tensor.dtype not in SUPPORTED_DTYPES.values():
            raise ValueError(f"{os.path.join(self.folder, file)}: {key} is stored as "
                             f"{tensor.dtype}; only {', '.join(SUPPORTED_DTYPES)} weights are "
                             "supported (no quantized checkpoints)")
        return tensor

    def find(self, key):
        """The file that stores `key`, or None."""
        return next((f for f, keys in self.files.items() if key in keys), None)

    def map(self, ours, theirs, build=lambda *t: t[0]):
        """Our key `ours` is built by `build` from the stored tensors `theirs` ([(file, key)] or
        [key])."""
        parts = [(p if isinstance(p, tuple) else (self.find(p), p)) for p in theirs]
        self.sources[ours] = (parts, build)

    def __contains__(self, ours):
        return ours in self.sources and all(f is not None for f, _ in self.sources[ours][0])

    def describe(self, ours):
        parts = self.sources.get(ours, ([], None))[0]
        missing = [k for f, k in parts if f is None]
        if missing:
            files = ", ".join(sorted(self.files)) or "the files"
            return f"key {', '.join(missing)} is in none of {files}"
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
            more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
            shown = ", ".join(unexpected[:5]) + more
            raise KeyError(f"{self.folder}: unexpected weights {shown}; the config.json does not "
                           "describe this checkpoint (wrong model_type, n_layer or head?)")


def load_native(folder):
    config = GPTConfig(**read_json(os.path.join(folder, "gpt_config.json")))
    weights = Weights(folder)
    weights.add_file(os.path.join(folder, "model.safetensors"))
    for key in weights.files["model.safetensors"]:
        weights.map(key, [key])
    return config, weights


def gpt2_config(hf, where, common):
    require((not (hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn")),
             f"{where}: scale_attn_by_inverse_layer_idx and reorder_and_upcast_attn are not "
             "supported"),
            (hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
             f"{where}: activation_function {hf.get('activation_function')!r} is not supported "
             "(GPT-2 uses gelu_new)"))
    return GPTConfig(block_size=hf["n_positions"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                     n_embd=hf["n_embd"],
                     intermediate_size=hf.get("n_inner") or 0,
                     norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                     tie_embeddings=hf.get("tie_word_embeddings", True), **common)


def rope_settings(hf, where):
    """(rope_theta, rope_scaling) of an HF config, in the transformers 5 (rope_parameters) or 4
    spelling."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    scaled = rope.get("rope_type", rope.get("type")) not in (None, "default")
    return rope.get("rope_theta", hf.get("rope_theta", 10000.0)), rope if scaled else None


def llama_config(hf, where, common):
    require((not (hf.get("attention_bias") or hf.get("mlp_bias")),
             f"{where}: attention_bias / mlp_bias are not supported"),
            (hf.get("hidden_act", "silu") == "silu",
             f"{where}: hidden_act {hf.get('hidden_act')!r} is not supported (Llama uses silu)"))
    theta, scaling = rope_settings(hf, where)
    return GPTConfig(block_size=hf.get("max_position_embeddings", 2048),
                     n_layer=hf["num_hidden_layers"],
                     n_head=hf["num_attention_heads"], n_kv_head=hf.get("num_key_value_heads") or 0,
                     n_embd=hf["hidden_size"], head_dim=hf.get("head_dim") or 0,
                     intermediate_size=hf["intermediate_size"],
                     norm_eps=hf.get("rms_norm_eps", 1e-6),
                     rope_theta=theta, rope_scaling=scaling,
                     tie_embeddings=hf.get("tie_word_embeddings", False), **LLAMA_LAYOUT, **common)


def falcon_config(hf, where, common):
    theta, scaling = rope_settings(hf, where)
    require((not hf.get("alibi"),
             f"{where}: Falcon with ALiBi positions (alibi: true) is not supported; rotary ones "
             "are"),
            (hf.get("activation", "gelu") == "gelu",
             f"{where}: activation {hf.get('activation')!r} is not supported (Falcon uses gelu)"),
            (not scaling, f"{where}: rope scaling {scaling} is not supported for Falcon"))
    n_head, new_layout = hf["num_attention_heads"], hf.get("new_decoder_architecture", False)
    # Falcon-40B/180B: grouped key/value heads; two norms unless num_ln_in_parallel_attn says one
    if new_layout:
        n_kv_head = hf.get("num_kv_heads") or n_head
        block = "parallel" if hf.get("num_ln_in_parallel_attn") == 1 else "parallel2"
    # Falcon-7B: one key/value head (multi-query), attention and MLP in parallel from one norm
    else:
        n_kv_head = 1 if hf.get("multi_query", True) else n_head
        block = "parallel" if hf.get("parallel_attn", True) else "sequential"
    return GPTConfig(block_size=hf.get("max_position_embeddings", 2048),
                     n_layer=hf["num_hidden_layers"],
                     n_head=n_head, n_kv_head=n_kv_head, n_embd=hf["hidden_size"],
                     intermediate_size=hf.get("ffn_hidden_size") or 0, norm="layernorm",
                     norm_eps=hf.get("layer_norm_epsilon", 1e-5), positions="rope",
                     mlp="gelu_exact", block=block,
                     bias=hf.get("bias", False), rope_theta=theta,
                     tie_embeddings=hf.get("tie_word_embeddings", True), **common)


def load_hf(folder):
    """A Hugging Face folder: GPT-2, Llama or Falcon, causal LM or sequence classification;
    safetensors or .bin."""
    hf = read_json(os.path.join(folder, "config.json"))
    families = {"gpt2": (gpt2_config, map_gpt2), "llama": (llama_config, map_llama_hf),
                "falcon": (falcon_config, map_falcon)}
    if hf.get("model_type") not in families:
        raise ValueError(f"{folder}/config.json: model_type {hf.get('model_type')!r} is not "
                         f"supported; this project loads {', '.join(map(repr, families))}")
    read_config, map_keys = families[hf["model_type"]]
    arch = (hf.get("architectures") or [""])[0]
    n_labels = (len(hf.get("id2label", {})) or hf.get("num_labels",
                                                      2)) if "SequenceClassification" in arch else 0
    head = "score.weight"
    # UltraRM: a Llama body and a bias-free regression_head, one score
    if arch == "LlamaRewardModel":
        n_labels, head = 1, "regression_head.weight"
    eos = hf.get("eos_token_id")
    common = dict(vocab_size=hf["vocab_size"], n_labels=n_labels,
                  pad_token_id=hf.get("pad_token_id"),
                  eos_token_ids=[] if eos is None else eos if isinstance(eos, list) else [eos])
    config = read_config(hf, f"{folder}/config.json", common)

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
    map_keys(weights, config)
    if n_labels:
        weights.map("score.weight", [head])
    return config, weights


def map_gpt2(weights, config):
    # the legacy pytorch_model.bin has no "transformer." prefix and carries causal-mask buffers
    prefix = "transformer." if weights.find("transformer.wte.weight") else ""
    weights.ignore(lambda k: k.endswith((".attn.bias", ".attn.masked_bias")))
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
    map_lm_head(weights, config)


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
        weights.map(f"{b}mlp.fc.weight", [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"],
                    cat)
        weights.map(f"{b}mlp.proj.weight", [h + "mlp.down_proj.weight"])
    weights.map("norm_f.weight", ["model.norm.weight"])
    map_lm_head(weights, config)


def map_lm_head(weights, config):
    """The LM head: its own weights, or the embedding's when tied (a file that stores the tied copy
    again has it ignored); a reward model has its score head instead."""
    if config.tie_embeddings:
        weights.ignore(lambda k: k == "lm_head.weight")
    elif not config.n_labels:
        weights.map("lm_head.weight", ["lm_head.weight"])


def map_falcon(weights, config):
    """Falcon's keys. Its fused query_key_value rows are laid out per key/value group (the group's
    queries, then its key, then its value); ours are all queries, then all keys, then all values."""
    hd, n_head, n_kv = config.head_dim, config.n_head, config.n_kv_head

    def split_qkv(w):  # (rows, ...) in Falcon's order -> ours
        # every Falcon layout is (n_kv groups, n_head/n_kv queries + a key + a value, hd):
        # multi-query is one group, the per-head layout n_head groups of one query each
        w = w.view(n_kv, n_head // n_kv + 2, hd, *w.shape[1:])
        return torch.cat([w[:, :-2].flatten(0, 2), w[:, -2].flatten(0, 1), w[:, -1].flatten(0, 1)])

    weights.map("wte.weight", ["transformer.word_embeddings.weight"])
    norms = {"parallel": [("norm1", "input_layernorm")],
             "parallel2": [("norm1", "ln_attn"), ("norm2", "ln_mlp")],
             "sequential": [("norm1", "input_layernorm"),
                            ("norm2", "post_attention_layernorm")]}[config.block]
    linears = [("attn.qkv", "self_attention.query_key_value"),
               ("attn.proj", "self_attention.dense"),
               ("mlp.fc", "mlp.dense_h_to_4h"), ("mlp.proj", "mlp.dense_4h_to_h")]
    for i in range(config.n_layer):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        for ours, theirs in norms:
            for p in ("weight", "bias"):
                weights.map(f"{b}{ours}.{p}", [f"{h}{theirs}.{p}"])
        for ours, theirs in linears:
            for p in ("weight", "bias") if config.bias else ("weight",):
                weights.map(f"{b}{ours}.{p}", [f"{h}{theirs}.{p}"],
                            split_qkv if ours == "attn.qkv" else lambda t: t)
    for p in ("weight", "bias"):
        weights.map(f"norm_f.{p}", ["transformer.ln_f." + p])
    map_lm_head(weights, config)


def meta_to_halves(w, n_heads):
    """Meta's RoPE rotates interleaved pairs (0,1),(2,3)...; ours rotates halves (i, i+hs/2):
    permute q/k rows."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim,
                                                                                       in_dim)


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
            raise KeyError(f"{shards[0]}: key {key} is missing; this is not a Meta Llama "
                           "checkpoint")
    n_embd = params["dim"]
    # Llama 2 splits the embedding over its width (dim 1), Llama 3 over the vocabulary (dim 0)
    emb_rows, emb_cols = first["tok_embeddings.weight"]().shape
    emb_split = 0 if emb_cols == n_embd else 1
    scaling = None
    if params.get("use_scaled_rope"):  # Llama 3.1 and 3.2
        scaling = dict(LLAMA31_ROPE, factor=params.get("rope_scaling_factor", 8.0))
    config = GPTConfig(block_size=params.get("max_seq_len", 8192 if scaling is None else 131072),
                       vocab_size=emb_rows * (len(files) if emb_split == 0 else 1),
                       n_layer=params["n_layers"],
                       n_head=params["n_heads"], n_kv_head=params.get("n_kv_heads") or 0,
                       n_embd=n_embd,
                       intermediate_size=first["layers.0.feed_forward.w1.weight"]().shape[0]
                       * len(files),
                       norm_eps=params.get("norm_eps", 1e-5),
                       rope_theta=params.get("rope_theta", 10000.0),
                       rope_scaling=scaling, tie_embeddings=False, **LLAMA_LAYOUT)
    map_meta(weights, files, config, emb_split)
    return config, weights


def map_meta(weights, files, config, emb_split=0):
    """Meta's keys (also llama2.c's), from one file or several model-parallel shards."""
    n_head, n_kv_head = config.n_head, config.n_kv_head

    def sharded(ours, key, dim):
        # model-parallel shards split column-parallel weights on dim 0, row-parallel ones on dim 1;
        # dim None: replicated on every shard (the norms), read from the first
        if dim is None:
            weights.map(ours, [(files[0], key)])
        else:
            weights.map(ours, [(f, key) for f in files], lambda *t: torch.cat(t, dim=dim))

    sharded("wte.weight", "tok_embeddings.weight", emb_split)
    s = len(files)
    for i in range(config.n_layer):
        h, b = f"layers.{i}.", f"blocks.{i}."
        sharded(f"{b}norm1.weight", h + "attention_norm.weight", None)
        sharded(f"{b}norm2.weight", h + "ffn_norm.weight", None)
        q, k, v = ([(f, f"{h}attention.{x}.weight") for f in files] for x in ("wq", "wk", "wv"))
        weights.map(f"{b}attn.qkv.weight", q + k + v, lambda *t: torch.cat([
            meta_to_halves(torch.cat(t[:s]), n_head), meta_to_halves(torch.cat(t[s:2 * s]),
                                                                     n_kv_head),
            torch.cat(t[2 * s:])]))
        sharded(f"{b}attn.proj.weight", h + "attention.wo.weight", 1)
        w1, w3 = ([(f, f"{h}feed_forward.{x}.weight") for f in files] for x in ("w1", "w3"))
        weights.map(f"{b}mlp.fc.weight", w1 + w3,
                    lambda *t: torch.cat([torch.cat(t[:s]), torch.cat(t[s:])]))
        sharded(f"{b}mlp.proj.weight", h + "feed_forward.w2.weight", 1)
    sharded("norm_f.weight", "norm.weight", None)
    if config.tie_embeddings:
        weights.ignore(lambda k: k == "output.weight")
    else:
        sharded("lm_head.weight", "output.weight", 0)
    weights.ignore(lambda k: k in ("rope.freqs", "freqs_cos", "freqs_sin"))
    for f in files[1:]:  # norms are replicated on every shard; only the first copy is read
        weights.used.update((f, k) for k in weights.files[f] if k.endswith("norm.weight"))


LLAMA2C_MAGIC = 0x616B3432  # "ak42": llama2.c's .bin files from version 1 on


def load_llama2c(path):
    """A llama2.c checkpoint (`model.bin`, as its export.py writes it): version 0 (a 28-byte header,
    then fp32 tensors), 1 (a 256-byte header with a magic number, fp32) or 2 (int8 in groups with
    fp32 scales, dequantized here). Its tensors take Meta's names, so map_meta reads them; its RoPE
    is Meta's interleaved one."""
    data = open(path, "rb").read()
    version, offset, shared, group_size, sizes = read_llama2c_header(path, data)
    dim, hidden, n_layer, n_head, n_kv_head, vocab, max_seq_len = sizes
    hd = dim // n_head
    layers = lambda name, *shape: [(f"layers.{i}.{name}", shape) for i in range(n_layer)]
    norms = [*layers("attention_norm.weight", dim), *layers("ffn_norm.weight", dim),
             ("norm.weight", (dim,))]
    matrices = [("tok_embeddings.weight", (vocab, dim)),
                *layers("attention.wq.weight", n_head * hd, dim),
                *layers("attention.wk.weight", n_kv_head * hd, dim),
                *layers("attention.wv.weight", n_kv_head * hd, dim),
                *layers("attention.wo.weight", dim, n_head * hd),
                *layers("feed_forward.w1.weight", hidden, dim),
                *layers("feed_forward.w2.weight", dim, hidden),
                *layers("feed_forward.w3.weight", hidden, dim)]
    output = [] if shared else [("output.weight", (vocab, dim))]
    if version == 0:
        freqs = [("freqs_cos", (max_seq_len, hd // 2)), ("freqs_sin", (max_seq_len, hd // 2))]
        order = [matrices[0], *norms[:n_layer], *matrices[1:1 + 4 * n_layer],
                 *norms[n_layer:2 * n_layer],
                 *matrices[1 + 4 * n_layer:], norms[-1], *freqs, *output]
    else:
        order = norms + matrices + output
    tensors, offset = read_llama2c_tensors(data, offset, order, group_size if version == 2 else 0,
                                           dict(norms))
    if len(tensors) < len(order) or offset != len(data):
        raise ValueError(f"{path}: {len(data)} bytes, but a llama2.c version-{version} file with "
                         f"this header holds {offset if len(tensors) == len(order) else 'more'}; "
                         "it is truncated or not a llama2.c checkpoint")
    config = GPTConfig(block_size=max_seq_len, vocab_size=vocab, n_layer=n_layer, n_head=n_head,
                       n_kv_head=n_kv_head,
                       n_embd=dim, intermediate_size=hidden, norm_eps=1e-5, tie_embeddings=shared,
                       # a TinyStories story ends with BOS (1), or EOS (2)
                       eos_token_ids=[2, 1], **LLAMA_LAYOUT)
    weights = Weights(os.path.dirname(path))
    name = os.path.basename(path)
    weights.files[name] = {k: (lambda t=t: t) for k, t in tensors.items()}
    map_meta(weights, [name], config)
    return config, weights


def read_llama2c_header(path, data):
    """(version, offset of the first tensor, shared classifier, int8 group size, the 7 sizes: dim,
    hidden, n_layer, n_head, n_kv_head, vocab, max_seq_len) of a llama2.c checkpoint's header."""
    if len(data) < 28:
        raise ValueError(f"{path} is too short to be a llama2.c checkpoint")
    magic, version = struct.unpack_from("Ii", data, 0)
    if magic == LLAMA2C_MAGIC:
        if version not in (1, 2):
            raise ValueError(f"{path}: llama2.c version {version} is not supported (versions 0, 1 "
                             "and 2 are)")
        sizes = struct.unpack_from("7i", data, 8)
        group_size = struct.unpack_from("i", data, 37)[0] if version == 2 else 0
        version, offset, shared = version, 256, bool(data[36])
    else:  # version 0: the header alone; a negative vocabulary size: the classifier is not shared
        sizes = struct.unpack_from("7i", data, 0)
        version, offset, shared, group_size = 0, 28, sizes[5] > 0, 0
        sizes = sizes[:5] + (abs(sizes[5]),) + sizes[6:]
    dim, _, n_layer, n_head, n_kv_head, vocab, _ = sizes
    heads_fit = 0 < n_head <= dim and 0 < n_kv_head <= n_head and dim % n_head == 0
    if not (heads_fit and n_layer > 0 and vocab > 0):
        raise ValueError(f"{path} is not a llama2.c checkpoint (its header reads dim {dim}, "
                         f"{n_layer} layers, {n_head} heads, vocabulary {vocab})")
    return version, offset, shared, group_size, sizes


def read_llama2c_tensors(data, offset, order, group_size, fp32_names):
    """The tensors of `order` ([(name, shape)]) read one after another from offset on: fp32, or,
    with a group_size (version 2), int8 values then one fp32 scale per group (except fp32_names).
    Returns (the tensors read, the offset after them); it stops at the first that the data cannot
    hold."""
    tensors = {}
    for name, shape in order:
        n = math.prod(shape)
        # int8 values, then one fp32 scale per group of them
        if group_size and name not in fp32_names:
            need = n + 4 * (n // group_size)
            if offset + need > len(data):
                break
            q = torch.frombuffer(bytearray(data[offset:offset + n]), dtype=torch.int8).float()
            scales = torch.frombuffer(bytearray(data[offset + n:offset + need]),
                                      dtype=torch.float32)
            tensors[name] = (q.view(-1, group_size) * scales[:, None]).view(shape)
        else:
            need = 4 * n
            if offset + need > len(data):
                break
            tensors[name] = torch.frombuffer(bytearray(data[offset:offset + need]),
                                             dtype=torch.float32).view(shape)
        offset += need
    return tensors, offset
