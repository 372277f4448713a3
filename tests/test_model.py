"""model.py against transformers: logits, greedy tokens, reward heads; the KV cache against a full recompute."""

import pytest
import torch

from conftest import random_model, tiny_falcon, tiny_gpt2, tiny_llama
from plumbing.checkpoints import from_pretrained
from generate import SamplingConfig, sample
from model import GPTConfig

CASES = {
    "gpt2": lambda d: tiny_gpt2(d),
    "gpt2-untied": lambda d: tiny_gpt2(d, tie=False),
    "llama-mha": lambda d: tiny_llama(d, n_kv_head=4),
    "llama-gqa": lambda d: tiny_llama(d, n_kv_head=2),
    "llama-gqa-tied": lambda d: tiny_llama(d, n_kv_head=2, tie=True),
    "llama3-rope-scaling": lambda d: tiny_llama(d, n_kv_head=2, rope_scaling=True),
    "falcon-7b": lambda d: tiny_falcon(d),
    "falcon-40b": lambda d: tiny_falcon(d, new_decoder_architecture=True, num_kv_heads=2),
    "falcon-per-head-sequential-bias": lambda d: tiny_falcon(d, multi_query=False, parallel_attn=False, bias=True,
                                                              tie=False),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_and_greedy_tokens_match_transformers(case, tmp_path, tokens):
    ref = CASES[case](tmp_path)
    model = from_pretrained(str(tmp_path))
    with torch.no_grad():
        assert (model(tokens) - ref(tokens).logits).abs().max() <= 1e-4
        expected = ref.generate(tokens[:1, :8], max_new_tokens=32, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, 8:].tolist()
    ours = sample(model, [tokens[0, :8].tolist()], SamplingConfig(max_new_tokens=32, temperature=0, eos_ids=[]))
    assert ours.tokens[0] == expected and len(expected) == 32


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_reward_head_scores_match_transformers(family, tmp_path, tokens):
    ref = (tiny_gpt2 if family == "gpt2" else tiny_llama)(tmp_path, cls_head=True)
    model = from_pretrained(str(tmp_path))
    assert model.config.n_labels == 1
    prompts = [tokens[0, :20].tolist(), tokens[1, :11].tolist(), tokens[2, :5].tolist()]
    from model import left_pad
    idx, mask = left_pad(prompts, "cpu")
    with torch.no_grad():
        ours = model.reward_scores(idx, mask)
        for i, p in enumerate(prompts):  # each alone: the reference has no position ids for left padding
            expected = ref(torch.tensor([p])).logits[0]
            assert (ours[i] - expected).abs().max() <= 1e-4


def test_ultrarm_regression_head_matches_a_transcription_on_transformers_llama(tmp_path, tokens):
    # UltraRM: LlamaModel, then a bias-free Linear(hidden, 1) "regression_head" read at the last token
    import json
    from safetensors.torch import save_file
    ref = tiny_llama(tmp_path / "causal", n_kv_head=2)
    torch.manual_seed(3)
    head = torch.randn(1, 32)
    state = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"} | {"regression_head.weight": head}
    (tmp_path / "ultrarm").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "ultrarm" / "model.safetensors"))
    config = json.loads((tmp_path / "causal" / "config.json").read_text()) | {"architectures": ["LlamaRewardModel"]}
    (tmp_path / "ultrarm" / "config.json").write_text(json.dumps(config))
    model = from_pretrained(str(tmp_path / "ultrarm"))
    with torch.no_grad():
        for row in tokens:
            hidden = ref.model(row[None]).last_hidden_state  # (1, T, C)
            expected = (hidden[:, -1] @ head.T)[0]
            assert (model.reward_scores(row[None])[0] - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", ["gpt2", "llama", "falcon"])
def test_cached_decoding_equals_full_recompute(kind, tokens):
    model = random_model(kind)
    with torch.no_grad():
        full = model.states(tokens)
        cache = model.new_cache(3, 20)
        step_by_step = [model.states(tokens[:, :7], cache)]  # a prefill, then one token at a time
        step_by_step += [model.states(tokens[:, t:t + 1], cache) for t in range(7, 20)]
        assert (torch.cat(step_by_step, dim=1) - full).abs().max() <= 1e-5


def test_presets_build():
    config = GPTConfig.preset("llama-3.1-8b")
    assert config.n_kv_head == 8 and config.head_dim == 128 and config.rope_scaling["factor"] == 8.0
    assert GPTConfig.preset("gpt2-xl").n_embd == 1600
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.preset("gpt5")


def test_rewinding_the_cache_forgets_the_last_positions(tokens):
    model = random_model("llama")
    with torch.no_grad():
        cache = model.new_cache(3, 20)
        model.states(tokens[:, :10], cache)
        model.states(tokens[:, 10:13], cache)  # a look-ahead of three tokens...
        cache.rewind(3)  # ...forgotten
        assert cache.length == 10
        after = model.states(tokens[:, 10:12], cache)
        assert (after - model.states(tokens[:, :12])[:, 10:]).abs().max() <= 1e-5
        with pytest.raises(ValueError, match="cannot rewind 13 positions of a cache holding 12"):
            cache.rewind(13)
