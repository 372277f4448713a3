"""The exercises of course mode (assignment.py), graded through tests/adapters.py only: against snapshots.npz (made
by the reference code, committed) and against properties that any correct solution has. `pytest -m e6 tests/` runs
one exercise's tests."""

import os

import numpy as np
import pytest
import torch

import adapters
from make_snapshots import inputs, shift, tiny_model, tiny_value

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


@pytest.mark.e3
def test_e3_the_edit_reaches_the_head_but_never_the_cache():
    model, x = tiny_model(), inputs()
    prompts = x["tokens"][:, :4].tolist()
    tokens, states = adapters.greedy(model, prompts, 6, edit=shift)
    with torch.no_grad():  # property: the recorded states are those of a plain forward pass over the tokens
        full = model.states(torch.tensor([p + t for p, t in zip(prompts, tokens)]))
    for i, s in enumerate(states):
        assert (s - full[i, 3:3 + s.shape[0]]).abs().max() <= 1e-5
    assert adapters.greedy(model, prompts, 6)[0] == adapters.greedy(model, prompts, 6, edit=lambda o: o)[0]
    assert tokens == SNAPSHOTS["e3_tokens"].tolist()
    close(torch.stack(states), "e3_states")


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
