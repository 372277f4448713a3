"""The hidden exercise tests: the teacher's, never in a student copy (course/exercises.py, TEACHER_ONLY); grading
(course/grading.py) runs them beside the public ones. The same properties on inputs the student never saw (other
shapes, gamma < 1, grouped-query attention, random responses), against plain worked-out answers written here, so
code fitted to the public tests' inputs fails them."""

from collections import Counter

import pytest
import torch

import adapters
from model import GPT, GPTConfig
from test_exercises import Remembering, Table
from value import ValueConfig, ValueFunction


@pytest.mark.e1
@pytest.mark.parametrize("prefill", [1, 3, 7])
def test_e1_a_llama_with_grouped_query_attention_through_the_cache(prefill):
    torch.manual_seed(11)
    model = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=3, n_head=4, n_kv_head=2, n_embd=16, norm="rmsnorm",
                          positions="rope", mlp="swiglu", bias=False, tie_embeddings=False)).eval()
    tokens = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(12))
    cached = adapters.cached_states(model, tokens, prefill=prefill)
    with torch.no_grad():
        assert (cached - model.states(tokens)).abs().max() <= 1e-5, (
            f"prefill {prefill}, then one token at a time, on 3 layers with 2 key/value heads: the cached states "
            "differ from a full forward pass")


@pytest.mark.e2
def test_e2_an_untied_head_and_a_two_label_reward_model():
    torch.manual_seed(13)
    model = GPT(GPTConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=8, tie_embeddings=False)).eval()
    o = torch.randn(2, 3, 8)  # (B, T, C): every position at once
    assert (adapters.head(model, o) - o @ model.lm_head.weight.T).abs().max() <= 1e-6, (
        "an untied model's head is its own matrix lm_head, applied to every position")
    rm = GPT(GPTConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=8, n_labels=2)).eval()
    assert (adapters.head(rm, o) - rm.score(o)).abs().max() <= 1e-6, "a reward model's head is self.score"


def double_and_lower(o):  # another edit than the public tests'
    return 2 * o - 0.3


@pytest.mark.e3
def test_e3_another_edit_through_the_memory():
    model = Remembering()
    prompts = [[3, 1, 4], [1, 5, 9], [2, 6, 5]]
    tokens, states = adapters.greedy(model, prompts, 5, edit=double_and_lower)
    with torch.no_grad():
        for prompt, response, s in zip(prompts, tokens, states):
            expected = []
            for _ in range(5):  # each decision from a fresh pass over everything read so far, edited at the end
                o = model.states(torch.tensor([prompt + expected]))[0, -1]
                expected.append(int(model.head(double_and_lower(o)).argmax()))
            assert response == expected, "the greedy tokens of W edit(o_t), o_t read through the memory, differ"
            own = model.states(torch.tensor([prompt + response]))[0, len(prompt) - 1:]
            assert (s - own).abs().max() <= 1e-5, "the recorded states must be the model's own (no edit in them)"
    o = torch.randn(3, 16)
    logits, _ = adapters.logits(model, o, double_and_lower, want_base=False)
    with torch.no_grad():
        assert (logits - model.head(double_and_lower(o))).abs().max() <= 1e-6, "the logits are W edit(o_t)"


def returns_by_hand(values, lengths, rewards, lam, gamma):
    """G_t of each response, walked back from its own end, one number at a time."""
    out = {}
    for b, length in enumerate(lengths):
        G = float(rewards[b])
        out[b, length - 1] = G
        for t in reversed(range(length - 1)):
            G = gamma * ((1 - lam) * float(values[b, t + 1]) + lam * G)
            out[b, t] = G
    return out


def padded_batch():
    g = torch.Generator().manual_seed(14)
    lengths = [1, 3, 6, 4]
    mask = torch.tensor([[t < n for t in range(6)] for n in lengths])
    return lengths, mask, torch.randn(4, 6, generator=g), torch.randn(4, generator=g)


@pytest.mark.e6
@pytest.mark.parametrize("lam,gamma", [(0.0, 0.7), (0.3, 0.9), (0.8, 1.0), (1.0, 0.8)])
def test_e6_returns_of_responses_of_four_lengths(lam, gamma):
    lengths, mask, values, rewards = padded_batch()
    before = values.clone()
    got = adapters.returns(values, mask, rewards, lam, gamma=gamma)
    assert torch.equal(values, before), "lambda_returns changed the caller's values in place"
    for (b, t), expected in returns_by_hand(values, lengths, rewards, lam, gamma).items():
        assert float(got[b, t]) == pytest.approx(expected, abs=1e-5), (
            f"response {b} (of {lengths[b]} states), t = {t}, lambda = {lam}, gamma = {gamma}: expected "
            f"{expected:.4f}, got {float(got[b, t]):.4f}")


@pytest.mark.e6
def test_e6_the_loss_of_responses_of_four_lengths():
    lengths, mask, values, rewards = padded_batch()
    table = Table(values.tolist())
    loss = adapters.loss(table, torch.zeros(4, 6, 3), mask, rewards, 0.4, gamma=0.9)
    targets = returns_by_hand(values, lengths, rewards, 0.4, 0.9)
    expected = sum((float(values[b, t]) - G) ** 2 for (b, t), G in targets.items()) / len(targets)
    assert loss.item() == pytest.approx(expected, rel=1e-5), "the mean of (V - G)^2 over the 14 real states differs"
    loss.backward()
    for (b, t), G in targets.items():
        assert float(table.values.grad[b, t]) == pytest.approx(2 * (float(values[b, t]) - G) / 14, abs=1e-6), (
            "the loss's gradient must reach V(o_t) only (the targets held fixed)")
    assert table.values.grad[~mask].abs().max() == 0, "padding must get no gradient"


@pytest.mark.e7
@pytest.mark.parametrize("n_steps,step_size,l2", [(4, 0.2, 0.3), (2, 1.5, 0.0)])
def test_e7_ascent_on_another_value(n_steps, step_size, l2):
    torch.manual_seed(15)
    value = ValueFunction(ValueConfig(n_embd=6, width=5, activation="relu")).requires_grad_(False)
    o = torch.randn(4, 6)
    before = o.clone()
    got = adapters.control(value, o, step_size=step_size, n_steps=n_steps, l2=l2)
    assert torch.equal(o, before), "control changed the caller's states in place"
    u = torch.zeros(4, 6)
    for _ in range(n_steps):  # by autograd, a fresh gradient at every step
        x = (o + u).requires_grad_(True)
        (grad,) = torch.autograd.grad(value(x).sum(), x)
        u = u + step_size * (grad - 2 * l2 * u)
    assert (got - u).abs().max() <= 1e-5, f"{n_steps} steps of alpha {step_size}, l2 {l2} give another u"


def diversity_by_hand(responses):
    scores = []
    for tokens in responses:
        score = 1.0
        for n in (2, 3, 4):
            grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
            if grams:
                score *= len(grams) / sum(grams.values())
        scores.append(score)
    return sum(scores) / len(scores)


@pytest.mark.e8
def test_e8_random_responses():
    g = torch.Generator().manual_seed(16)
    responses = [torch.randint(0, 3, (int(n),), generator=g).tolist() for n in torch.randint(0, 13, (20,), generator=g)]
    assert adapters.diversity(responses) == pytest.approx(diversity_by_hand(responses)), (
        "the mean diversity of 20 random responses (0 to 12 tokens of 3 kinds) differs")
