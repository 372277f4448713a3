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
