"""generate.py's sampling loop: batched with left padding = one by one, EOS and stop strings, seeds, top-k, top-p."""

import pytest
import torch

from conftest import random_model
from generate import SamplingConfig, next_token, row_seeds, row_uniforms, sample


@pytest.mark.parametrize("kind", ["gpt2", "llama", "falcon"])
def test_batched_with_left_padding_equals_one_by_one(kind, tokens):
    model = random_model(kind)
    prompts = [tokens[0, :3].tolist(), tokens[1, :12].tolist(), tokens[2, :7].tolist()]
    batch = sample(model, prompts, SamplingConfig(max_new_tokens=10, temperature=0, eos_ids=[]), record_states=True)
    for i, p in enumerate(prompts):
        alone = sample(model, [p], SamplingConfig(max_new_tokens=10, temperature=0, eos_ids=[]), record_states=True)
        assert batch.tokens[i] == alone.tokens[0]
        assert (batch.states[i] - alone.states[0]).abs().max() <= 1e-5


def test_eos_and_stop_strings_cut_the_response_and_its_states():
    model = random_model("gpt2")
    first = sample(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=12, temperature=0, eos_ids=[]), record_states=True)
    y = first.tokens[0]
    eos_at = 5
    cut = sample(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=12, temperature=0, eos_ids=[y[eos_at]]), record_states=True)
    k = y.index(y[eos_at])
    assert cut.tokens[0] == y[:k] and cut.states[0].shape[0] == k + 1
    assert (cut.states[0] - first.states[0][:k + 1]).abs().max() == 0

    class Chars:  # a toy tokenizer: token i is the character chr(65 + i % 26)
        def decode(self, ids):
            return "".join(chr(65 + i % 26) for i in ids)
    text = Chars().decode(y)
    stop = text[6:8]
    cut = sample(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=12, temperature=0, eos_ids=[], stop=[stop]), tokenizer=Chars())
    assert cut.texts[0] == text[:text.find(stop)]


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = random_model("llama")
    a = sample(model, [[1, 2], [3]], SamplingConfig(max_new_tokens=8, temperature=1.0, eos_ids=[]), seed=3)
    b = sample(model, [[1, 2], [3]], SamplingConfig(max_new_tokens=8, temperature=1.0, eos_ids=[]), seed=3)
    assert a.tokens == b.tokens
    greedy = sample(model, [[1, 2], [3]], SamplingConfig(max_new_tokens=8, temperature=0, eos_ids=[]))
    assert sample(model, [[1, 2], [3]], SamplingConfig(max_new_tokens=8, top_k=1, eos_ids=[]), seed=5).tokens == greedy.tokens
    assert sample(model, [[1, 2], [3]], SamplingConfig(max_new_tokens=8, top_p=1e-6, eos_ids=[]), seed=5).tokens == greedy.tokens


def test_top_p_keeps_exactly_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    uniforms = 1 - torch.rand(300, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seen = {next_token(logits, 1.0, None, 0.7, u).item() for u in uniforms}
    assert seen == {0, 1}  # 0.5 < 0.7 so the second token is needed; 0.8 >= 0.7 so no third


def test_inverse_cdf_draws_each_token_as_often_as_its_probability_and_never_a_ruled_out_one():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    logits = probs.log()[None].expand(4000, -1)  # -inf where the probability is 0
    uniforms = row_uniforms(row_seeds(0, 0, 1), 4000, "cpu")[0]
    counts = torch.bincount(next_token(logits, 1.0, None, None, uniforms), minlength=6) / 4000
    assert counts[[0, 2, 5]].sum() == 0 and (counts - probs).abs().max() < 0.03  # sd of a frequency here: <= 0.008
    extremes = torch.tensor([1.0, 2.0 ** -53], dtype=torch.float64)  # the largest and (nearly) the smallest draws
    assert next_token(logits[:2], 1.0, None, None, extremes).tolist() == [4, 1]


def test_a_response_depends_on_its_own_seed_not_on_its_batch():
    model = random_model("llama")
    config = SamplingConfig(max_new_tokens=10, eos_ids=[])
    prompts, seeds = [[1, 2], [3], [4, 5, 6]], row_seeds(7, 0, 3)
    together = sample(model, prompts, config, seed=seeds).tokens
    assert [sample(model, [p], config, seed=[s]).tokens[0] for p, s in zip(prompts, seeds)] == together
    assert sample(model, prompts[::-1], config, seed=seeds[::-1]).tokens == together[::-1]
    assert sample(model, prompts, config, seed=7).tokens == together  # an int seed: row_seeds(seed, 0, B)
    assert sample(model, prompts, config, seed=8).tokens != together


def test_prompt_longer_than_context_is_a_clear_error():
    model = random_model("gpt2")
    with pytest.raises(ValueError, match="exceeds the context of 64"):
        sample(model, [list(range(1, 60))], SamplingConfig(max_new_tokens=10))
