"""
The language model as a dynamical system (docs/method.md, E1-E3), in one file.

One GPT class covers GPT-2 and Llama (2, 3, 3.1, 3.2) through its config. The state of the system is
explicit: `states()` returns o_t, the last-layer representation after the final norm, while it reads and
extends a KV cache (the memory h_t); `head()` maps o to logits. RE-Control edits o between the two.

Also here: weight loading (HF GPT-2, HF Llama, Meta Llama, sequence-classification reward heads),
tokenizers built offline with tiktoken, and the one sampling loop that plain and controlled decoding share.
"""

import base64
import glob
import json
import math
import os
from dataclasses import dataclass, field, asdict

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# config


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (prompt + response) the model accepts
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0  # 0 means n_head (multi-head attention); fewer is grouped-query attention
    n_embd: int = 768
    head_dim: int = 0  # 0 means n_embd // n_head
    intermediate_size: int = 0  # MLP width; 0 means 4 * n_embd
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm" (Llama)
    norm_eps: float = 1e-5
    positions: str = "learned"  # "learned" (GPT-2) or "rope" (Llama)
    mlp: str = "gelu"  # "gelu" (tanh approximation, GPT-2) or "swiglu" (Llama)
    bias: bool = True  # biases in every Linear (GPT-2); Llama has none
    tie_embeddings: bool = True  # the LM head reuses the token embedding matrix
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3.1: {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    n_labels: int = 0  # > 0: a sequence-classification head "score" (a reward model) replaces the LM head
    eos_token_ids: list = field(default_factory=list)
    pad_token_id: int | None = None

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.intermediate_size = self.intermediate_size or 4 * self.n_embd
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.positions not in ("learned", "rope"):
            raise ValueError(f"positions must be 'learned' or 'rope', got {self.positions!r}")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")

    @classmethod
    def preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


_LLAMA = dict(norm="rmsnorm", positions="rope", mlp="swiglu", bias=False)
_LLAMA3 = dict(_LLAMA, vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5)
_LLAMA31_ROPE = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "llama-2-7b": dict(_LLAMA, vocab_size=32000, n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008,
                       block_size=4096, norm_eps=1e-5, tie_embeddings=False),
    "llama-3-8b": dict(_LLAMA3, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, intermediate_size=14336,
                       block_size=8192, tie_embeddings=False),
    "llama-3.2-1b": dict(_LLAMA3, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, intermediate_size=8192,
                         block_size=131072, rope_scaling=dict(_LLAMA31_ROPE, factor=32.0)),
    "llama-3.2-3b": dict(_LLAMA3, n_layer=28, n_head=24, n_kv_head=8, n_embd=3072, intermediate_size=8192,
                         block_size=131072, rope_scaling=dict(_LLAMA31_ROPE, factor=32.0)),
    "llama-3.1-8b": dict(_LLAMA3, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, intermediate_size=14336,
                         block_size=131072, tie_embeddings=False, rope_scaling=dict(_LLAMA31_ROPE, factor=8.0)),
}

# -----------------------------------------------------------------------------
# the network


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # statistics in fp32 even for a bf16 model, then back to the input dtype before the gain (as Llama does)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(config):
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_frequencies(config):
    """Inverse frequencies of RoPE, (head_dim/2,), with Llama 3.1's long-context rescaling when configured."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    scaling = config.rope_scaling
    if not scaling or scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        return inv_freq
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise ValueError(f"unsupported rope_scaling {scaling}; only rope_type 'llama3' is implemented")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated smoothly
    smooth = ((old_context / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rotate_half(x):
    # split-halves RoPE layout (HF Llama); Meta's interleaved weights are permuted into it when loading
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.split = [q_dim, kv_dim, kv_dim]
        self.qkv = nn.Linear(config.n_embd, q_dim + 2 * kv_dim, bias=config.bias)  # q, k, v in one matmul
        self.proj = nn.Linear(q_dim, config.n_embd, bias=config.bias)

    def forward(self, x, rope, mask, cache, layer):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            cos, sin = rope  # (B, 1, T, hs)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.write(layer, k, v)  # (B, nkv, L, hs): every key so far, this step's included
        # mask None: causal over a fresh sequence, or a single new token that may see the whole cache
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        width = config.intermediate_size
        self.fc = nn.Linear(config.n_embd, 2 * width if self.swiglu else width, bias=config.bias)
        self.proj = nn.Linear(width, config.n_embd, bias=config.bias)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.fc(x).chunk(2, dim=-1)  # Llama's gate_proj and up_proj, fused
            return self.proj(F.silu(gate) * up)
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(config)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask, cache, layer):
        x = x + self.attn(self.norm1(x), rope, mask, cache, layer)
        return x + self.mlp(self.norm2(x))


class KVCache:
    """The memory h_t of E1: keys and values of every layer, preallocated and written in place."""

    def __init__(self, config, batch_size, max_len, dtype, device):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.real = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # False: left padding
        self.length = 0  # slots filled so far (the same for every row: padding keeps rows aligned)
        self.max_len = max_len

    def write(self, layer, k, v):
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.positions == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)
        if config.n_labels:
            self.score = nn.Linear(config.n_embd, config.n_labels, bias=False)
        else:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            if config.tie_embeddings:
                self.lm_head.weight = self.wte.weight
        if config.positions == "rope":
            self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # residual projections, scaled as in GPT-2
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self, batch_size, max_len):
        if max_len > self.config.block_size:
            raise ValueError(f"a cache of {max_len} positions exceeds the context of {self.config.block_size}; "
                             "shorten the prompt or lower max_new_tokens")
        return KVCache(self.config, batch_size, max_len, self.wte.weight.dtype, self.wte.weight.device)

    def states(self, idx, cache=None, attention_mask=None):
        """o (B, T, C) after the final norm: the state o_t of E1 at every new position.

        idx (B, T) are the new tokens; attention_mask (B, T) is 1 for real tokens and 0 for left padding.
        With a cache, the new tokens attend to everything cached before them and are appended to it.
        """
        B, T = idx.shape
        device = idx.device
        real = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        start = 0 if cache is None else cache.length
        if start + T > (self.config.block_size if cache is None else cache.max_len):
            raise ValueError(f"{start + T} positions do not fit in the context of "
                             f"{self.config.block_size if cache is None else cache.max_len}; use a shorter prompt")
        if cache is not None:
            cache.real[:, start:start + T] = real
            keys_real = cache.real[:, :start + T]  # (B, L)
        else:
            keys_real = real
        # a token's position counts the real tokens before it, so left padding does not shift positions
        past = keys_real[:, :start].sum(1, keepdim=True)
        pos = (past + real.cumsum(1) - 1).clamp(min=0)  # (B, T)

        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.config.positions == "learned":
            x = x + self.wpe(pos)
        else:
            freqs = pos[:, None, :, None].float() * self.inv_freq  # (B, 1, T, hs/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (B, 1, T, hs)
            rope = (emb.cos().to(x.dtype), emb.sin().to(x.dtype))

        mask = None
        if not bool(keys_real.all()) or (start > 0 and T > 1):
            # With a cache the query at slot start+i may see key slots 0..start+i (causal), but no padding.
            # A padding query would then see nothing at all (softmax over nothing is NaN): it sees itself.
            q_slot = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
            k_slot = torch.arange(start + T, device=device)[None, :]  # (1, L)
            mask = (k_slot <= q_slot) & (keys_real[:, None, :] | (k_slot == q_slot))  # (B, T, L)
            mask = mask[:, None]  # (B, 1, T, L)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, mask, cache, layer)
        if cache is not None:
            cache.length += T
        return self.norm_f(x)

    def head(self, o):
        """E2: logits W o (or, for a reward model, the scores of its classification head)."""
        return self.lm_head(o) if not self.config.n_labels else self.score(o)

    def forward(self, idx, attention_mask=None):
        return self.head(self.states(idx, attention_mask=attention_mask))  # (B, T, vocab)

    def reward_scores(self, idx, attention_mask=None):
        """A reward model's scores (B, n_labels), read at each row's last real token (HF's convention)."""
        if not self.config.n_labels:
            raise ValueError("reward_scores needs a sequence-classification model (config.n_labels > 0)")
        o = self.states(idx, attention_mask=attention_mask)
        if attention_mask is None:
            last = torch.full((idx.shape[0],), idx.shape[1] - 1, device=idx.device)
        else:  # the rightmost real token, whichever side the padding is on
            last = (torch.arange(idx.shape[1], device=idx.device) * attention_mask.long()).argmax(-1)
        return self.score(o[torch.arange(idx.shape[0], device=idx.device), last])

    @classmethod
    def from_pretrained(cls, name_or_dir, dtype=None, device=None):
        """A model in eval mode from a local folder (HF config.json or Meta params.json) or a hub name."""
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
            model = cls(config)
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

    def save_pretrained(self, folder):
        """Our own layout: gpt_config.json (the GPTConfig) and model.safetensors under our key names."""
        from safetensors.torch import save_file
        os.makedirs(folder, exist_ok=True)
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings and not self.config.n_labels:
            state.pop("lm_head.weight")  # the same tensor as wte.weight
        write_atomically(os.path.join(folder, "model.safetensors"), lambda path: save_file(state, path))
        write_text_atomically(os.path.join(folder, "gpt_config.json"), json.dumps(asdict(self.config), indent=1))


def write_atomically(path, write):
    """write(tmp) then rename over `path`: a crash leaves the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def write_text_atomically(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    write_atomically(path, write)


# -----------------------------------------------------------------------------
# loading weights

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
                from safetensors import safe_open
                handle = safe_open(path, framework="pt")
                self.files[name] = {k: (lambda k=k, h=handle: h.get_tensor(k)) for k in handle.keys()}
            else:
                data = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
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
                           else None, tie_embeddings=hf.get("tie_word_embeddings", False), **_LLAMA, **common)
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
        scaling = dict(_LLAMA31_ROPE, factor=params.get("rope_scaling_factor", 8.0))
    config = GPTConfig(block_size=params.get("max_seq_len", 8192 if scaling is None else 131072),
                       vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd,
                       intermediate_size=intermediate, norm_eps=params.get("norm_eps", 1e-5),
                       rope_theta=params.get("rope_theta", 10000.0), rope_scaling=scaling,
                       tie_embeddings=False, **_LLAMA)

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


# -----------------------------------------------------------------------------
# tokenizers: tiktoken encodings built offline from the files of a checkpoint folder

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)])  # 256 in all (Llama 3.1)
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "</s>")


def gpt2_byte_alphabet():
    """GPT-2's map from bytes to printable unicode characters, used to write byte strings in vocab.json."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:  # unprintable bytes are shifted above 255
            chars[b] = chr(256 + n)
            n += 1
    return chars


def read_tiktoken_ranks(path):
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}, line {n}: expected '<base64 token> <rank>' (tiktoken format); "
                                 "a sentencepiece tokenizer.model needs its tokenizer.json instead") from None
    return ranks


def gpt2_encoding(folder, vocab_name, merges_name):
    vocab = read_json(os.path.join(folder, vocab_name))
    config_path = os.path.join(folder, "tokenizer_config.json")
    added = read_json(config_path).get("added_tokens_decoder", {}) if os.path.exists(config_path) else {}
    special_names = {"<|endoftext|>"} | {t["content"] for t in added.values() if t.get("special", True)}
    byte_of = {c: b for b, c in gpt2_byte_alphabet().items()}
    ranks, specials = {}, {}
    for token, rank in vocab.items():
        if token in special_names:
            specials[token] = rank
            continue
        try:
            ranks[bytes(byte_of[c] for c in token)] = rank
        except KeyError:
            raise ValueError(f"{folder}/{vocab_name}: token {token!r} is not written in GPT-2's byte alphabet; "
                             "this is not a byte-level BPE vocabulary") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{folder}/{vocab_name}: {len(missing)} single bytes have no token (e.g. {missing[0]}); "
                         "a byte-level BPE needs all 256")
    # tiktoken merges the pair whose result has the lowest id; that is the merges file's order only when
    # the ids of merged tokens grow with their merge's line number (true of GPT-2 and of BPE trainers)
    with open(os.path.join(folder, merges_name), encoding="utf-8") as f:
        merges = [line.split() for line in f if line.strip() and not line.startswith("#version")]
    last = -1
    for n, pair in enumerate(merges):
        if len(pair) != 2:
            raise ValueError(f"{folder}/{merges_name}: line {n + 1} is not a pair of tokens")
        merged = vocab.get(pair[0] + pair[1])
        if merged is None or merged <= last:
            raise ValueError(f"{folder}/{merges_name}: merge {n + 1} {pair} does not produce a token whose id "
                             "grows with the merge order; tiktoken cannot represent this vocabulary")
        last = merged
    return tiktoken.Encoding(name=f"gpt2-bpe:{os.path.abspath(folder)}", pat_str=GPT2_PATTERN,
                             mergeable_ranks=ranks, special_tokens=specials)


def llama3_encoding(path, folder):
    ranks = read_tiktoken_ranks(path)
    config_path = os.path.join(folder, "tokenizer_config.json")
    added = read_json(config_path).get("added_tokens_decoder", {}) if os.path.exists(config_path) else {}
    if added:
        specials = {t["content"]: int(i) for i, t in added.items()}
    else:
        specials = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIALS)}
    return tiktoken.Encoding(name=f"llama3:{os.path.abspath(path)}", pat_str=LLAMA3_PATTERN,
                             mergeable_ranks=ranks, special_tokens=specials)


class HFTokenizer:
    """A tokenizer.json (sentencepiece models: Llama 2, Vicuna) behind tiktoken's encode/decode calls."""

    def __init__(self, path):
        from tokenizers import Tokenizer
        self.tokenizer = Tokenizer.from_file(path)
        self.name = f"tokenizers:{path}"
        self.n_vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_tokens_set = {t.content for t in self.tokenizer.get_added_tokens_decoder().values()}

    def encode(self, text, allowed_special=(), disallowed_special="all"):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, errors="replace"):
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def encode_single_token(self, text):
        token = self.tokenizer.token_to_id(text)
        if token is None:
            raise KeyError(text)
        return token


def byte_encoding(words=(), name="bytes"):
    """A byte-level encoding for models trained from scratch: 256 byte tokens, then `words` as single tokens
    (each is one piece of the GPT-2 split, e.g. " great"), then <|endoftext|>."""
    ranks = {bytes([b]): b for b in range(256)}
    for w in words:
        ranks.setdefault(w.encode(), len(ranks))
    # tiktoken returns a piece that is itself in the vocabulary as one token before trying any merge
    return tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


def save_tokenizer(enc, folder):
    """Write a tiktoken encoding as tokenizer.model (base64 ranks) and tiktoken.json (split pattern, specials)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.model"), "w") as f:
        for token, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    with open(os.path.join(folder, "tiktoken.json"), "w") as f:
        json.dump({"name": enc.name, "pat_str": enc._pat_str, "special_tokens": enc._special_tokens}, f)


def load_tokenizer(folder):
    """A tiktoken.Encoding (or, for sentencepiece models, an object with the same encode/decode) built offline."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    path = lambda *p: os.path.join(folder, *p)
    if os.path.exists(path("tiktoken.json")):  # written by save_tokenizer
        meta = read_json(path("tiktoken.json"))
        return tiktoken.Encoding(name=meta["name"], pat_str=meta["pat_str"], special_tokens=meta["special_tokens"],
                                 mergeable_ranks=read_tiktoken_ranks(path("tokenizer.model")))
    for model_file in (path("tokenizer.model"), path("original", "tokenizer.model")):
        if os.path.exists(model_file):
            with open(model_file, "rb") as f:
                head = f.read(64)
            if b" " in head.split(b"\n")[0]:  # tiktoken's text format; sentencepiece's is binary protobuf
                return llama3_encoding(model_file, folder)
    if os.path.exists(path("vocab.json")) and os.path.exists(path("merges.txt")):
        return gpt2_encoding(folder, "vocab.json", "merges.txt")
    if os.path.exists(path("encoder.json")) and os.path.exists(path("vocab.bpe")):
        return gpt2_encoding(folder, "encoder.json", "vocab.bpe")
    if os.path.exists(path("tokenizer.json")):
        try:
            return HFTokenizer(path("tokenizer.json"))
        except ImportError:
            raise ImportError(f"{folder} has a sentencepiece tokenizer (tokenizer.json); reading it needs the "
                              "optional package: pip install tokenizers") from None
    raise FileNotFoundError(f"{folder} has no tokenizer files we can read: expected vocab.json + merges.txt "
                            "(GPT-2), encoder.json + vocab.bpe, tokenizer.model in tiktoken format (Llama 3), "
                            "tiktoken.json + tokenizer.model (ours), or tokenizer.json (with `tokenizers`)")


def eos_token_ids(enc):
    """The ids of the end-of-sequence specials the encoding knows."""
    ids = []
    for name in EOS_NAMES:
        try:
            ids.append(enc.encode_single_token(name))
        except KeyError:
            pass
    return ids


def llama3_chat_prompt(messages):
    """Llama 3 instruct's chat template for [{"role", "content"}, ...], ending where the assistant speaks."""
    text = "<|begin_of_text|>"
    for m in messages:
        text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
    return text + "<|start_header_id|>assistant<|end_header_id|>\n\n"


# -----------------------------------------------------------------------------
# sampling: one loop for the base model and for the controlled one


@dataclass
class Generation:
    tokens: list  # per row, the response token ids, cut before EOS / the stop string
    texts: list  # per row, the decoded response (None without a tokenizer)
    states: list | None = None  # per row, o_0 ... o_T (T+1, C) when record_states was asked for
    kl: list | None = None  # per row, the mean per-token KL from the base model when record_kl was asked for


def next_token(logits, temperature, top_k, top_p, generator):
    """E2: y ~ softmax(logits / tau), optionally truncated to the top-k tokens or the top-p nucleus."""
    logits = logits.float()  # (B, vocab)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # tokens entirely beyond the nucleus
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts, device):
    """Prompts of different lengths as one (B, P) batch, padded on the left, with its attention mask."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    idx = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        idx[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return idx, mask


def cut_at_stop(tokens, enc, stop_strings):
    """The longest token prefix whose text ends before the first stop string (None: no stop string in it)."""
    text = enc.decode(tokens)
    hits = [text.find(s) for s in stop_strings if s in text]
    if not hits:
        return None
    end = min(hits)
    n = len(tokens)
    while n and len(enc.decode(tokens[:n])) > end:
        n -= 1
    return n


def kl_divergence(logits, base_logits, temperature):
    """KL(p || p_base) per row between the sampling distribution and the base model's, at temperature tau."""
    tau = temperature or 1.0
    logp, logq = (logits.float() / tau).log_softmax(-1), (base_logits.float() / tau).log_softmax(-1)
    return (logp.exp() * (logp - logq)).nan_to_num().sum(-1)  # tokens removed from p (logp = -inf) add 0


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_ids=None,
             stop_strings=(), tokenizer=None, seed=None, edit=None, rescore=None, record_states=False,
             record_kl=False):
    """Sample responses for a batch of prompts (lists of token ids) with a preallocated KV cache.

    edit, when given, maps the newest state o_t (B, C) to o_t + u_t before the head (E3); the cache never
    sees it. rescore(logits, tokens, cache), when given, rewrites the logits (B, vocab) of each step from the
    response tokens so far (B, t) and the cache (reward-guided decoding). record_states keeps o_0 ... o_T of
    every response (E1); record_kl the mean per-token KL from the base model's next-token distribution.
    eos_ids default to the checkpoint's, else the tokenizer's end-of-sequence specials.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop strings need the tokenizer to read the text")
    device = model.wte.weight.device
    if eos_ids is None:  # the checkpoint's own, else the end-of-sequence specials the tokenizer knows
        eos_ids = model.config.eos_token_ids or (eos_token_ids(tokenizer) if tokenizer is not None else [])
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    idx, attention_mask = left_pad(prompts, device)
    B, P = idx.shape
    if P + max_new_tokens > model.config.block_size:
        raise ValueError(f"a prompt of {P} tokens plus {max_new_tokens} new tokens exceeds the context of "
                         f"{model.config.block_size}; shorten the prompt or lower max_new_tokens")
    cache = model.new_cache(B, P + max_new_tokens)
    o = model.states(idx, cache, attention_mask)[:, -1]  # (B, C): o_0, the state at the last prompt token
    eos = torch.tensor(list(eos_ids) or [-1], device=device)
    out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    kl = torch.zeros(B, max_new_tokens, device=device)
    length = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)  # response tokens kept per row
    done = torch.zeros(B, dtype=torch.bool, device=device)
    trajectory = [o]
    steps = 0
    for t in range(max_new_tokens):
        base_logits = model.head(o) if edit is None or record_kl else None  # E2
        logits = model.head(edit(o)) if edit is not None else base_logits  # E3: W (o_t + u_t)
        if rescore is not None:
            logits = rescore(logits, out[:, :t], cache)
        if record_kl and logits is not base_logits:  # sampling from the base model itself: KL stays 0
            kl[:, t] = kl_divergence(logits, base_logits, temperature)
        y = next_token(logits, temperature, top_k, top_p, generator)  # (B,)
        out[:, t] = y
        steps = t + 1
        ended = ~done & torch.isin(y, eos)
        length[ended] = t  # the EOS token itself is not part of the response
        done |= ended
        if stop_strings:
            for i in (~done).nonzero().flatten().tolist():
                n = cut_at_stop(out[i, :t + 1].tolist(), tokenizer, stop_strings)
                if n is not None:
                    length[i], done[i] = n, True
        if bool(done.all()) or (t == max_new_tokens - 1 and not record_states):
            break
        o = model.states(y[:, None], cache)[:, -1]  # E1: (h_{t+1}, o_{t+1}) = f_LM(h_t, y_{t+1})
        trajectory.append(o)
    tokens = [out[i, :length[i]].tolist() for i in range(B)]
    texts = [tokenizer.decode(t) for t in tokens] if tokenizer is not None else [None] * B
    generation = Generation(tokens=tokens, texts=texts)
    if record_states:
        stacked = torch.stack(trajectory, dim=1)  # (B, steps+1, C)
        generation.states = [stacked[i, :length[i] + 1] for i in range(B)]  # o_0 ... o_T of each response
    if record_kl:  # every decision of the response counts, the one that ended it included
        generation.kl = [kl[i, :min(int(length[i]) + 1, steps)].mean().item() for i in range(B)]
    return generation
