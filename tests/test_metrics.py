"""E8 metrics, each on a case computed by hand."""

import math

import pytest
import torch

from evaluation import metrics
from generate import SamplingConfig, kl_divergence, sample
from model import GPT, GPTConfig


class StubModel:
    """Stands in for GPT: states are one-hot token ids (C = vocab); the head returns fixed log-probabilities."""

    def __init__(self, vocab, head_logits):
        self.wte = torch.nn.Embedding(vocab, 1)
        self.vocab, self.head_logits = vocab, head_logits

    def states(self, idx, attention_mask=None):
        return torch.nn.functional.one_hot(idx, self.vocab).float()  # (B, T, vocab)

    def head(self, o):
        return self.head_logits.expand(*o.shape[:-1], self.vocab)


def test_diversity_hand_case():
    # [1,2,1,2,1]: bigrams 2 unique of 4, trigrams 2 of 3, 4-grams 2 of 2 -> 1/3. [1,2]: 1 of 1 -> 1.
    assert metrics.diversity([[1, 2, 1, 2, 1], [1, 2]]) == pytest.approx((1 / 3 + 1) / 2)
    assert metrics.diversity([[5, 5, 5, 5]]) == pytest.approx(1 / 3 * 1 / 2 * 1)


def test_perplexity_hand_cases():
    uniform = StubModel(10, torch.zeros(10))
    assert metrics.perplexity(uniform, [[1, 2], [3]], [[4, 5, 6], [7]]) == pytest.approx(10.0)
    half_on_three = torch.log(torch.tensor([0.5 / 9] * 3 + [0.5] + [0.5 / 9] * 6))
    model = StubModel(10, half_on_three)
    assert metrics.perplexity(model, [[1], [2, 2, 2]], [[3, 3], [3]]) == pytest.approx(2.0)
    # one token of probability 0.5 and one of 0.5/9: exp(-(ln 0.5 + ln(0.5/9)) / 2)
    assert metrics.perplexity(model, [[1]], [[3, 4]]) == pytest.approx(math.exp(-(math.log(0.5) + math.log(0.5 / 9)) / 2))


def test_coherence_hand_case():
    model = StubModel(4, torch.zeros(4))
    # prompt [0, 1] embeds to (.5, .5, 0, 0); response [1] to (0, 1, 0, 0): cosine 1/sqrt(2). Response [2]: 0.
    assert metrics.coherence(model, [[0, 1], [0, 1]], [[1], [2]]) == pytest.approx((1 / math.sqrt(2) + 0) / 2)
    assert math.isnan(metrics.coherence(model, [[0]], [[]]))


def test_kl_divergence_hand_case():
    p, q = torch.log(torch.tensor([[0.5, 0.5]])), torch.log(torch.tensor([[0.25, 0.75]]))
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert kl_divergence(p, q, 1.0).item() == pytest.approx(expected)
    truncated = torch.tensor([[0.0, float("-inf")]])  # p puts everything on token 0
    assert kl_divergence(truncated, q, 1.0).item() == pytest.approx(math.log(4))


def test_generate_records_kl_from_the_base_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    plain = sample(model, [[1, 2], [3]], SamplingConfig(max_new_tokens=6, eos_ids=[]), seed=0, record_kl=True)
    assert plain.kl == [0.0, 0.0]
    shift = lambda o: o + 1.0
    one_step = sample(model, [[1, 2]], SamplingConfig(max_new_tokens=1, eos_ids=[]), seed=0, record_kl=True, edit=shift)
    with torch.no_grad():
        o = model.states(torch.tensor([[1, 2]]))[:, -1]
        expected = kl_divergence(model.head(shift(o)), model.head(o), 1.0).item()
    assert expected > 0 and one_step.kl[0] == pytest.approx(expected, rel=1e-5)
    shifted = sample(model, [[1, 2], [3]], SamplingConfig(max_new_tokens=6, eos_ids=[]), seed=0, record_kl=True, edit=shift)
    assert all(k > 0 for k in shifted.kl)


def test_small_metrics():
    assert metrics.grammatical_fraction(["a", "bb", "c"], lambda r: len(r) == 1) == pytest.approx(2 / 3)
    assert metrics.throughput(n_tokens=300, n_responses=10, seconds=2.0) == (200.0, 150.0)
    assert metrics.mean_and_spread([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert metrics.mean_and_spread([1.0]) == (1.0, 0.0)
