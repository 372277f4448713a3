"""
The language model as a dynamical system (docs/method.md, E1-E2): the network, and nothing else.

One GPT class covers GPT-2, Llama (2, 3, 3.1, 3.2) and Falcon through its config. The state of the
system is explicit: `states()` returns o_t, the last-layer representation after the final norm,
while it reads and extends a KV cache (the memory h_t); `head()` maps o to logits. RE-Control edits
o between the two (E3).

Elsewhere: reading and writing weights (formats.py, checkpoints.py), tokenizers (tokenizer.py), the
sampling loop (generate.py).
"""

import math
from dataclasses import dataclass, field

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
    # "gelu" (tanh approximation, GPT-2), "gelu_exact" (erf, Falcon) or "swiglu" (Llama)
    mlp: str = "gelu"
    # "sequential": attention, then the MLP (GPT-2, Llama); "parallel": both read one norm of the
    # same input and both are added to it (Falcon-7B); "parallel2": the same, each with its own
    # norm (Falcon-40B)
    block: str = "sequential"
    # biases in every Linear (GPT-2); Llama and Falcon have none (Falcon's LayerNorms do)
    bias: bool = True
    tie_embeddings: bool = True  # the LM head reuses the token embedding matrix
    rope_theta: float = 10000.0
    # Llama 3.1: {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    rope_scaling: dict | None = None
    # > 0: a sequence-classification head "score" (a reward model) replaces the LM head
    n_labels: int = 0
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
        if self.mlp not in ("gelu", "gelu_exact", "swiglu"):
            raise ValueError(f"mlp must be 'gelu', 'gelu_exact' or 'swiglu', got {self.mlp!r}")
        if self.block not in ("sequential", "parallel", "parallel2"):
            raise ValueError("block must be 'sequential', 'parallel' or 'parallel2', got "
                             f"{self.block!r}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head "
                             f"({self.n_kv_head})")

    @classmethod
    def preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


LLAMA_LAYOUT = dict(norm="rmsnorm", positions="rope", mlp="swiglu", bias=False)
LLAMA3_LAYOUT = dict(LLAMA_LAYOUT, vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5)
FALCON_LAYOUT = dict(norm="layernorm", positions="rope", mlp="gelu_exact", bias=False,
                     block_size=2048)
LLAMA31_ROPE = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "llama-2-7b": dict(LLAMA_LAYOUT, vocab_size=32000, n_layer=32, n_head=32, n_embd=4096,
                       intermediate_size=11008,
                       block_size=4096, norm_eps=1e-5, tie_embeddings=False),
    "llama-3-8b": dict(LLAMA3_LAYOUT, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096,
                       intermediate_size=14336, block_size=8192, tie_embeddings=False),
    "llama-3.2-1b": dict(LLAMA3_LAYOUT, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048,
                         intermediate_size=8192,
                         block_size=131072, rope_scaling=dict(LLAMA31_ROPE, factor=32.0)),
    "llama-3.2-3b": dict(LLAMA3_LAYOUT, n_layer=28, n_head=24, n_kv_head=8, n_embd=3072,
                         intermediate_size=8192,
                         block_size=131072, rope_scaling=dict(LLAMA31_ROPE, factor=32.0)),
    "falcon-7b": dict(FALCON_LAYOUT, vocab_size=65024, n_layer=32, n_head=71, n_kv_head=1,
                      n_embd=4544, block="parallel", eos_token_ids=[11]),
    "falcon-40b": dict(FALCON_LAYOUT, vocab_size=65024, n_layer=60, n_head=128, n_kv_head=8,
                       n_embd=8192, block="parallel2", eos_token_ids=[11]),
    "llama-3.1-8b": dict(LLAMA3_LAYOUT, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096,
                         intermediate_size=14336,
                         block_size=131072, tie_embeddings=False,
                         rope_scaling=dict(LLAMA31_ROPE, factor=8.0)),
}

# -----------------------------------------------------------------------------
# the network


class RMSNorm(nn.Module):
    """Llama's norm: x / rms(x) times a learned gain; no mean subtracted, no bias."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # statistics in fp32 even for a bf16 model, then back to the input dtype before the gain (as
        # Llama does)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(config):
    """The norm the config names: GPT-2's LayerNorm or Llama's RMSNorm."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps)


def rope_frequencies(config):
    """Inverse frequencies of RoPE, (head_dim/2,), with Llama 3.1's long-context rescaling when
    configured."""
    hd = config.head_dim
    # pair i of each head turns by angle position * theta^(-2i/hs): fast for the first pairs, slow
    # for the last
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    scaling = config.rope_scaling
    if not scaling or scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        return inv_freq
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise ValueError(f"unsupported rope_scaling {scaling}; only rope_type 'llama3' is "
                         "implemented")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated
    # smoothly
    smooth = ((old_context / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rotate_half(x):
    # split-halves RoPE layout (HF Llama); Meta's interleaved weights are permuted into it when
    # loading
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Causal self-attention; with n_kv_head < n_head, groups of query heads share a key/value head
    (GQA)."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.head_dim
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.split = [q_dim, kv_dim, kv_dim]
        # q, k, v in one matmul
        self.qkv = nn.Linear(config.n_embd, q_dim + 2 * kv_dim, bias=config.bias)
        self.proj = nn.Linear(q_dim, config.n_embd, bias=config.bias)

    def forward(self, x, rope, mask, cache, layer):
        B, T, _ = x.shape
        # project to queries, keys and values, then split the channels into heads
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        # rotate q and k by their positions, so q.k depends on the distance between them
        if rope is not None:
            cos, sin = rope  # (B, 1, T, hs)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if cache is not None:
            # (B, nkv, L, hs): every key so far, this step's included
            k, v = cache.write(layer, k, v)
        # mask None: causal over a fresh sequence, or a single new token that may see the whole
        # cache
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv_head != self.n_head)
        # (B, nh, T, hs) -> (B, T, nh * hs): the heads side by side again, then back to the residual
        # width
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class MLP(nn.Module):
    """The feed-forward layer: GPT-2's or Falcon's GELU MLP, or Llama's SwiGLU (a gated one)."""

    def __init__(self, config):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        # GPT-2 approximates GELU with tanh
        self.gelu = "none" if config.mlp == "gelu_exact" else "tanh"
        width = config.intermediate_size
        self.fc = nn.Linear(config.n_embd, 2 * width if self.swiglu else width, bias=config.bias)
        self.proj = nn.Linear(width, config.n_embd, bias=config.bias)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.fc(x).chunk(2, dim=-1)  # Llama's gate_proj and up_proj, fused
            return self.proj(F.silu(gate) * up)
        return self.proj(F.gelu(self.fc(x), approximate=self.gelu))


class Block(nn.Module):
    """A pre-norm transformer block: attention (tokens read from each other) and the MLP (each token
    transformed on its own), added to the residual stream one after the other, or side by side
    (Falcon's parallel block)."""

    def __init__(self, config):
        super().__init__()
        self.parallel = config.block != "sequential"
        self.norm1 = make_norm(config)
        self.attn = Attention(config)
        # "parallel": one norm for both
        self.norm2 = make_norm(config) if config.block != "parallel" else None
        self.mlp = MLP(config)

    def forward(self, x, rope, mask, cache, layer):
        if self.parallel:  # both read the same x: x + attn(norm(x)) + mlp(norm(x))
            h = self.norm1(x)
            return x + self.attn(h, rope, mask, cache,
                                 layer) + self.mlp(h if self.norm2 is None else self.norm2(x))
        x = x + self.attn(self.norm1(x), rope, mask, cache, layer)
        return x + self.mlp(self.norm2(x))


class KVCache:
    """The memory h_t of E1: keys and values of every layer, preallocated and written in place."""

    def __init__(self, config, batch_size, max_len, dtype, device):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # False: left padding
        self.real = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0  # slots filled so far (the same for every row: padding keeps rows aligned)
        self.max_len = max_len

    def write(self, layer, k, v):
        """Store this step's keys and values (B, nkv, T, hs) of one layer after those already
        cached."""
        # >>> exercise E1: write k, v after the `length` filled slots; return all keys, values yet
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, nkv, end, hs) each
        # <<< exercise E1

    def rewind(self, n):
        """Forget the last n positions: a look-ahead leaves no trace (their slots are written again
        later)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot rewind {n} positions of a cache holding {self.length}")
        self.length -= n


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token -> vector
        # GPT-2 adds a learned vector per position; Llama rotates q, k instead
        if config.positions == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)  # its output is the state o_t
        if config.n_labels:  # a reward model: a score per label instead of next-token logits
            self.score = nn.Linear(config.n_embd, config.n_labels, bias=False)
        else:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            if config.tie_embeddings:  # GPT-2 reads the logits with the embedding matrix itself
                self.lm_head.weight = self.wte.weight
        if config.positions == "rope":
            self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # residual projections, scaled as in GPT-2
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        # GPT-2's initialisation, for models trained from scratch (the toy world's); loaded weights
        # replace it
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self, batch_size, max_len):
        """An empty KVCache for batch_size rows of up to max_len positions, in the model's dtype and
        device."""
        if max_len > self.config.block_size:
            raise ValueError(f"a cache of {max_len} positions exceeds the context of "
                             f"{self.config.block_size}; shorten the prompt or lower "
                             "max_new_tokens")
        return KVCache(self.config, batch_size, max_len, self.wte.weight.dtype,
                       self.wte.weight.device)

    def states(self, idx, cache=None, attention_mask=None):
        """o (B, T, C) after the final norm: the state o_t of E1 at every new position.

        idx (B, T) are the new tokens; attention_mask (B, T) is 1 for real tokens and 0 for left
        padding. With a cache, the new tokens attend to everything cached before them and are
        appended to it.
        """
        B, T = idx.shape
        device = idx.device
        real = torch.ones(B, T, dtype=torch.bool,
                          device=device) if attention_mask is None else attention_mask.bool()
        start = 0 if cache is None else cache.length  # slots already in the cache
        capacity = self.config.block_size if cache is None else cache.max_len
        if start + T > capacity:
            raise ValueError(f"{start + T} positions do not fit in the context of {capacity}; use "
                             "a shorter prompt")
        if cache is not None:  # remember which slots are padding, for every later step's attention
            cache.real[:, start:start + T] = real
            keys_real = cache.real[:, :start + T]  # (B, L)
        else:
            keys_real = real
        # a token's position counts the real tokens before it, so left padding does not shift
        # positions
        past = keys_real[:, :start].sum(1, keepdim=True)  # (B, 1)
        pos = (past + real.cumsum(1) - 1).clamp(min=0)  # (B, T)

        x = self.wte(idx)  # (B, T, C) token embeddings
        rope = None
        if self.config.positions == "learned":  # GPT-2: a learned vector per position, added
            x = x + self.wpe(pos)
        # Llama: positions rotate q and k inside attention; cos and sin computed once for all layers
        else:
            freqs = pos[:, None, :, None].float() * self.inv_freq  # (B, 1, T, hs/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (B, 1, T, hs)
            rope = (emb.cos().to(x.dtype), emb.sin().to(x.dtype))

        # None: plain causal attention (the fast path), when no padding and no cache interplay
        mask = None
        if not bool(keys_real.all()) or (start > 0 and T > 1):
            # With a cache the query at slot start+i may see key slots 0..start+i (causal), but no
            # padding. A padding query would then see nothing at all (softmax over nothing is NaN):
            # it sees itself.
            q_slot = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
            k_slot = torch.arange(start + T, device=device)[None, :]  # (1, L)
            mask = (k_slot <= q_slot) & (keys_real[:, None, :] | (k_slot == q_slot))  # (B, T, L)
            mask = mask[:, None]  # (B, 1, T, L), broadcast over heads
        for layer, block in enumerate(self.blocks):
            # each block appends its keys and values to the cache
            x = block(x, rope, mask, cache, layer)
        if cache is not None:
            cache.length += T
        return self.norm_f(x)  # (B, T, C): o_t, what the head reads

    def head(self, o):
        """E2: logits W o (or, for a reward model, the scores of its classification head)."""
        # >>> exercise E2: the head reads the state: self.lm_head (self.score when n_labels > 0)
        return self.lm_head(o) if not self.config.n_labels else self.score(o)
        # <<< exercise E2

    def forward(self, idx, attention_mask=None):
        return self.head(self.states(idx, attention_mask=attention_mask))  # (B, T, vocab)

    def reward_scores(self, idx, attention_mask=None):
        """A reward model's scores (B, n_labels), read at each row's last real token (HF's
        convention)."""
        if not self.config.n_labels:
            raise ValueError("reward_scores needs a sequence-classification model "
                             "(config.n_labels > 0)")
        o = self.states(idx, attention_mask=attention_mask)
        if attention_mask is None:
            last = torch.full((idx.shape[0],), idx.shape[1] - 1, device=idx.device)
        else:  # the rightmost real token, whichever side the padding is on
            last = (torch.arange(idx.shape[1],
                                 device=idx.device) * attention_mask.long()).argmax(-1)
        return self.score(o[torch.arange(idx.shape[0], device=idx.device), last])


def left_pad(prompts, device):
    """Token lists of different lengths as one (B, P) batch, padded on the left, with its attention
    mask (B, P)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    idx = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        idx[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return idx, mask
