"""generate.py's sampling loop: batched with left padding = one by one, EOS and stop strings, seeds, top-k, top-p."""

import pytest
import torch

from conftest import random_model
from generate import SamplingConfig, sample

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
    from generate import next_token
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {next_token(logits, 1.0, None, 0.7, g).item() for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.7 so the second token is needed; 0.8 >= 0.7 so no third


def test_prompt_longer_than_context_is_a_clear_error():
    model = random_model("gpt2")
    with pytest.raises(ValueError, match="exceeds the context of 64"):
        sample(model, [list(range(1, 60))], SamplingConfig(max_new_tokens=10))
