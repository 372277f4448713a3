"""The exercises of course mode (assignment.py), graded through tests/adapters.py only: against snapshots.npz (made
by the reference code, committed) and against properties that any correct solution has. `pytest -m e6 tests/` runs
one exercise's tests."""

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import adapters
from make_snapshots import inputs, shift, tiny_model, tiny_value
from test_value import TRUE_VALUES, learned_gamblers_ruin_values

SNAPSHOTS = np.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "snapshots.npz"))


def close(tensor, name, tol=1e-5):
    expected = SNAPSHOTS[name]
    assert tuple(tensor.shape) == expected.shape, f"{name}: shape {tuple(tensor.shape)}, expected {expected.shape}"
    assert np.abs(tensor.detach().float().numpy() - expected).max() <= tol, f"{name} differs from the reference"


@pytest.mark.e1
def test_e1_the_cache_gives_the_states_of_a_full_forward_pass():
    model, x = tiny_model(), inputs()
    cached = adapters.cached_states(model, x["tokens"], prefill=4)
    with torch.no_grad():
        assert (cached - model.states(x["tokens"])).abs().max() <= 1e-5  # property: memory = recomputation
    close(cached, "e1_states")


@pytest.mark.e2
def test_e2_the_head_reads_the_state():
    model, x = tiny_model(), inputs()
    logits = adapters.head(model, x["o"])
    assert (logits - x["o"] @ model.wte.weight.T).abs().max() <= 1e-5  # property: tied weights, W o
    close(logits, "e2_logits")


@pytest.mark.e2
def test_e2_a_reward_model_reads_its_score_head():
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    rm = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=16, n_labels=1)).eval()
    o = inputs()["o"]
    scores = adapters.head(rm, o)
    assert tuple(scores.shape) == (o.shape[0], 1) and (scores - rm.score(o)).abs().max() <= 1e-6, \
        "a reward model (config.n_labels > 0) has no LM head: E2 must read its score head, self.score"


class Memoryless(torch.nn.Module):
    """A stand-in language model for E3 that needs none of E1's or E2's code: the state is the embedding of the
    newest token (no memory), and the head a fixed matrix W."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.wte, self.W = torch.nn.Embedding(50, 16), torch.randn(50, 16)
        self.config = SimpleNamespace(block_size=64, eos_token_ids=[], vocab_size=50)

    def new_cache(self, batch_size, max_len):
        return SimpleNamespace(length=0)

    def states(self, idx, cache=None, attention_mask=None):
        if cache is not None:
            cache.length += idx.shape[1]
        return self.wte(idx)  # (B, T, C)

    def head(self, o):
        return o @ self.W.T


@pytest.mark.e3
def test_e3_the_edit_reaches_the_head_but_never_the_state():
    model = Memoryless()
    prompts = inputs()["tokens"][:, :4].tolist()
    tokens, states = adapters.greedy(model, prompts, 6, edit=shift)
    with torch.no_grad():
        for prompt, response, s in zip(prompts, tokens, states):
            previous, expected = prompt[-1], []
            for _ in range(6):  # greedy on W (o + 0.5), o the embedding of the token before
                previous = int((model.head(model.wte.weight[previous] + 0.5)).argmax())
                expected.append(previous)
            assert response == expected
            # the states the loop went through are the model's own, o_t of each token: the edit is not in them
            assert (s - model.wte(torch.tensor(prompt[-1:] + response))).abs().max() == 0
    assert adapters.greedy(model, prompts, 6)[0] == adapters.greedy(model, prompts, 6, edit=lambda o: o)[0]


class Remembering(Memoryless):
    """A stand-in language model with memory: the state is the newest token's embedding plus the mean of the
    embeddings of every token read so far, which the cache keeps (its h_t)."""

    def new_cache(self, batch_size, max_len):
        return SimpleNamespace(length=0, total=torch.zeros(batch_size, 16))

    def states(self, idx, cache=None, attention_mask=None):
        x = self.wte(idx)  # (B, T, C)
        before = cache.total if cache is not None else torch.zeros(x.shape[0], 16)
        seen = (cache.length if cache is not None else 0) + torch.arange(1, idx.shape[1] + 1)
        running = before[:, None] + x.cumsum(1)  # (B, T, C)
        if cache is not None:
            cache.total, cache.length = running[:, -1], cache.length + idx.shape[1]
        return x + running / seen[None, :, None]


@pytest.mark.e3
def test_e3_the_next_state_is_read_through_the_memory():
    model = Remembering()
    prompts = inputs()["tokens"][:, :4].tolist()
    tokens, states = adapters.greedy(model, prompts, 6, edit=shift)
    with torch.no_grad():
        for prompt, response, s in zip(prompts, tokens, states):
            own = model.states(torch.tensor([prompt + response]))[0, len(prompt) - 1:]  # one pass, no cache
            assert (s - own).abs().max() <= 1e-5, (
                "the states differ from the model's own over prompt + response: o_{t+1} must be read "
                "through the cache (the memory h_t), feeding the token y_{t+1}, never the edit")


@pytest.mark.e6
def test_e6_lambda_returns_by_hand():
    # one response of 3 states, values 0.2, 0.4, 0.6 and reward 1: G_2 = R = 1; with lambda 0.5 and gamma 1,
    # G_1 = 0.5 * 0.6 + 0.5 * 1 = 0.8, G_0 = 0.5 * 0.4 + 0.5 * 0.8 = 0.6; TD(0) bootstraps, Monte Carlo is R
    values, mask, reward = torch.tensor([[0.2, 0.4, 0.6]]), torch.ones(1, 3, dtype=torch.bool), torch.tensor([1.0])
    assert adapters.returns(values, mask, reward, 0.5)[0].tolist() == pytest.approx([0.6, 0.8, 1.0])
    assert adapters.returns(values, mask, reward, 0.0)[0].tolist() == pytest.approx([0.4, 0.6, 1.0])
    assert adapters.returns(values, mask, reward, 1.0)[0].tolist() == pytest.approx([1.0, 1.0, 1.0])
    x = inputs()
    for lam in (0.0, 0.5, 1.0):
        close(adapters.returns(x["values"], x["mask"], x["rewards"], lam, gamma=0.9)[x["mask"]],
              f"e6_returns_{lam}_real")


@pytest.mark.e6
def test_e6_the_stop_gradient_setting_is_obeyed_both_ways():
    values = torch.tensor([[0.2, 0.4, 0.6]], requires_grad=True)
    mask, reward = torch.ones(1, 3, dtype=torch.bool), torch.tensor([1.0])
    held = adapters.returns(values, mask, reward, 0.5, stop_gradient=True)
    free = adapters.returns(values, mask, reward, 0.5, stop_gradient=False)
    assert not held.requires_grad, "with stop_gradient=True the targets must be detached (sg[.] of E6)"
    assert free.requires_grad, ("with stop_gradient=False the targets must carry the gradient of the "
                                "values they bootstrap from (the official codes' variant): detach only "
                                "when stop_gradient is True")
    assert free.tolist() == held.tolist(), "stop_gradient changes the gradient, never the targets' values"


@pytest.mark.e6
def test_e6_discount_by_hand():
    # gamma 0.5, lambda 1: G_t = gamma^(T - t) R, the reward discounted once per step back, not once in all
    values, mask, reward = torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), torch.tensor([1.0])
    got = adapters.returns(values, mask, reward, 1.0, gamma=0.5)[0].tolist()
    assert got == pytest.approx([0.25, 0.5, 1.0]), f"G_t must be gamma^(T-t) R = [0.25, 0.5, 1], got {got}"


@pytest.mark.e6
def test_e6_the_loss_holds_its_targets_fixed():
    x, value = inputs(), tiny_value()
    for lam in (0.0, 0.5, 1.0):
        close(adapters.loss(value, x["states"], x["mask"], x["rewards"], lam), f"e6_loss_{lam}")
    values = torch.tensor([[0.2, 0.4, 0.6]], requires_grad=True)
    targets = adapters.returns(values, torch.ones(1, 3, dtype=torch.bool), torch.tensor([1.0]), 0.0)
    assert not targets.requires_grad  # the stop-gradient: no gradient flows into the targets


@pytest.mark.e7
def test_e7_one_ascent_step_follows_the_gradient_of_v():
    value, o = tiny_value(), inputs()["o"]
    assert adapters.control(value, o, step_size=0.5, n_steps=0).abs().max() == 0  # n = 0: the base model
    u = adapters.control(value, o, step_size=0.1, n_steps=1)
    eps = 1e-3  # property: u = alpha * dV/do, by central differences
    numeric = torch.stack([(value(o + eps * e) - value(o - eps * e)) / (2 * eps) for e in torch.eye(16)], dim=1)
    assert (u - 0.1 * numeric).abs().max() <= 1e-4
    close(adapters.control(value, o, step_size=0.3, n_steps=5, l2=0.1), "e7_u")


class LinearValue(torch.nn.Module):
    """V(o) = w . o: its gradient is w everywhere, so E7's steps can be worked out by hand."""

    def forward(self, o):
        return o.float().sum(-1)


@pytest.mark.e7
def test_e7_the_l2_penalty_by_hand():
    # V(o) = sum(o), grad w = 1: u_1 = alpha w; u_2 = u_1 + alpha (w - 2 l2 u_1) = alpha w (2 - 2 l2 alpha)
    o = torch.zeros(2, 4)
    u = adapters.control(LinearValue(), o, step_size=0.5, n_steps=2, l2=0.1)
    expected = 0.5 * (2 - 2 * 0.1 * 0.5)
    assert (u - expected).abs().max() <= 1e-6, (
        f"two steps with alpha 0.5, l2 0.1 give u = {expected} everywhere, got {u[0].tolist()}: each step "
        "is u <- u + alpha (grad V(o + u) - 2 l2 u); check the penalty's factor 2 and its sign, and that "
        "the gradient is taken afresh at every step")
    u = adapters.control(LinearValue(), o, step_size=0.5, n_steps=3)
    assert (u - 1.5).abs().max() <= 1e-6, (
        f"three steps of alpha 0.5 on a V whose gradient is 1 give u = 1.5, got {u[0].tolist()}: is a "
        "gradient left over from the step before added again (not zeroed between steps)?")


@pytest.mark.e8
def test_e8_the_mean_is_over_responses_of_any_length():
    # each response's own product, then the mean over responses; a response too short for any n-gram counts 1
    got = adapters.diversity([[1, 2, 1, 2, 1, 2], [1, 2, 3, 4, 5], [7]])
    assert got == pytest.approx((2 / 15 + 1 + 1) / 3), (
        f"expected the mean of 2/15, 1 and 1 (each response's own product), got {got}: n-grams are not "
        "pooled over responses, and short responses are not left out of the mean")


@pytest.mark.e8
def test_e8_diversity_by_hand():
    assert adapters.diversity([[1, 2, 3, 4, 5]]) == 1.0  # nothing repeats
    # [1, 2, 1, 2, 1, 2]: 2-grams 2 unique of 5, 3-grams 2 of 4, 4-grams 2 of 3 -> 0.4 * 0.5 * 2/3 = 2/15
    assert adapters.diversity([[1, 2, 1, 2, 1, 2]]) == pytest.approx(2 / 15)
    assert adapters.diversity([[7], [1, 2, 3, 4, 5]]) == 1.0  # too short for any n-gram: nothing against it


@pytest.mark.e6
def test_e6_training_on_gamblers_ruin_recovers_the_true_values():
    # a fair walk from 2 on 0..4, R = +1 at 4 and -1 at 0: the true value of state s is (s - 2) / 2
    learned = learned_gamblers_ruin_values(lambda value, *batch: adapters.loss(value, *batch, lam=0.5))
    assert (learned - TRUE_VALUES).abs().max() < 0.1
