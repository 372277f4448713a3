"""Shared helpers: tiny random checkpoints written with transformers (the reference) into temp folders."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
from model import GPT, GPTConfig  # noqa: E402
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 96


def tiny_gpt2(folder, tie=True, cls_head=False, seed=0, vocab_size=VOCAB):
    """A random 2-layer GPT-2 (or GPT2ForSequenceClassification) saved with save_pretrained."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                        tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None, pad_token_id=0, num_labels=1)
    model = (GPT2ForSequenceClassification if cls_head else GPT2LMHeadModel)(config).eval()
    with torch.no_grad():  # random biases and norm gains, so a wrong mapping cannot hide behind zeros/ones
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return model


def tiny_falcon(folder, new_decoder_architecture=False, multi_query=True, parallel_attn=True, num_kv_heads=None,
                bias=False, tie=True, seed=0, vocab_size=VOCAB):
    """A random 2-layer Falcon saved with save_pretrained: the 7B layout by default (multi-query, parallel block),
    the 40B/180B layout with new_decoder_architecture (grouped key/value heads, two norms)."""
    from transformers import FalconConfig, FalconForCausalLM
    torch.manual_seed(seed)
    config = FalconConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_kv_heads=num_kv_heads, new_decoder_architecture=new_decoder_architecture,
                          multi_query=multi_query, parallel_attn=parallel_attn, bias=bias, alibi=False,
                          max_position_embeddings=128, tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None,
                          pad_token_id=0)
    model = FalconForCausalLM(config).eval()
    with torch.no_grad():  # random norms and biases, so a wrong mapping cannot hide behind ones and zeros
        for name, p in model.named_parameters():
            if "layernorm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return model


def tiny_llama(folder, n_kv_head=4, tie=False, rope_scaling=None, cls_head=False, seed=0, rope_theta=500000.0,
               vocab_size=VOCAB, **save_kwargs):
    """A random 2-layer Llama (or LlamaForSequenceClassification) saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": rope_theta, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=n_kv_head, max_position_embeddings=128,
                         rope_parameters=rope, tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None,
                         pad_token_id=0, num_labels=1, rms_norm_eps=1e-5)
    model = (LlamaForSequenceClassification if cls_head else LlamaForCausalLM)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, **save_kwargs)
    return model


def random_model(kind):
    """A random 2-layer GPT-2 or Llama-layout model of ours (no transformers needed)."""
    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT(GPTConfig(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_embd=32)).eval()
    if kind == "falcon":
        return GPT(GPTConfig.preset("falcon-40b", vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                                    n_embd=32)).eval()
    return GPT(GPTConfig.preset("llama-3.2-1b", vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                                n_embd=32, intermediate_size=64)).eval()


TOKENIZER_TEXTS = [
    "Hello world! It's a test, isn't it? We'll see; they've gone, I'm here, you're there, he'd go.",
    "   leading spaces and  double  spaces\tand tabs\n\nand newlines   \n",
    "numbers 12345 and 3.14159 and 1,000,000 and 2024-11-21",
    "unicode: café, naïve, Größe, 日本語のテキスト, Ελληνικά, русский",
    "emoji 😀🎉👍🏽 and 🤖 mixed with text😀text",
    "<|endoftext|> is special only when allowed",
    "CamelCaseWords and snake_case_words and UPPER CASE!!!",
    "",
]


def train_gpt2_files(folder):
    """A GPT-2-format vocab.json + merges.txt (400 tokens) from a byte-level BPE trained here on a small corpus."""
    from tokenizers import ByteLevelBPETokenizer
    tok = ByteLevelBPETokenizer()
    corpus = [t * 3 for t in TOKENIZER_TEXTS[:-1]] + ["the quick brown fox jumps over the lazy dog"] * 20
    tok.train_from_iterator(corpus, vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>"])
    tok.save_model(str(folder))


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, VOCAB, (3, 20), generator=g)


FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@pytest.fixture(scope="session")
def tiny_world():
    """The committed tiny toy world (tests/make_fixtures.py made it): a base model folder and its value checkpoint."""
    return os.path.join(FIXTURES, "base"), os.path.join(FIXTURES, "value.pt")


ROLLOUT_FLAGS = ["--samples-per-prompt", "4", "--max-new-tokens", "32"]


@pytest.fixture(scope="session")
def tiny_rollouts(tiny_world, tmp_path_factory):
    """Rollouts of the tiny base model on the training prompts (4 per prompt), collected as ROLLOUT_FLAGS say."""
    from worlds import toy
    from generate import SamplingConfig
    from worlds import load_model
    from rollouts import collect_rollouts, rollout_job
    model, enc = load_model(tiny_world[0])
    folder = str(tmp_path_factory.mktemp("rollouts"))
    prompts = toy.World().train_prompts()
    collect_rollouts(model, enc, prompts, toy.reward, folder, SamplingConfig(max_new_tokens=32, samples_per_prompt=4),
                     made_by=rollout_job(model, enc, prompts, "toy", tiny_world[0]), log=lambda *a: None)
    return folder
