"""E5/E6: the value network, its Bellman loss on a problem with known values, and its checkpoints."""

import random

import pytest
import torch

from model import GPT, GPTConfig
from value import (ValueConfig, ValueFunction, bellman_loss, bellman_targets, load_value, save_value)

# Gambler's ruin on positions 0..4, start at 2, +-1 with probability 1/2, stop at 0 (R = -1) or 4 (R = +1).
# The true value of position k is (k - 2) / 2. States are one-hot; responses have many different lengths.
TRUE_VALUES = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])


def gamblers_ruin_batch(n, rng):
    walks = []
    for _ in range(n):
        walk = [2]
        while walk[-1] not in (0, 4):
            walk.append(walk[-1] + rng.choice((-1, 1)))
        walks.append(walk)
    L = max(len(w) for w in walks)
    states, mask = torch.zeros(n, L, 5), torch.zeros(n, L, dtype=torch.bool)
    for i, w in enumerate(walks):
        states[i, torch.arange(len(w)), torch.tensor(w)] = 1.0
        mask[i, :len(w)] = True
    rewards = torch.tensor([1.0 if w[-1] == 4 else -1.0 for w in walks])
    return states, mask, rewards


@pytest.mark.parametrize("method", ["td", "mc"])
def test_bellman_training_recovers_the_true_values(method):
    torch.manual_seed(0)
    rng = random.Random(0)
    value = ValueFunction(ValueConfig(n_embd=5, n_hidden=1, width=16))
    optimizer = torch.optim.Adam(value.parameters(), lr=1e-2)
    for step in range(400):
        states, mask, rewards = gamblers_ruin_batch(64, rng)
        loss = bellman_loss(value, states, mask, rewards, method=method)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        learned = value(torch.eye(5))
    assert (learned - TRUE_VALUES).abs().max() < 0.1, learned


def test_terminal_target_sits_at_each_responses_last_real_state():
    # Two responses of 3 and 5 states. The official code's mask.argmax() would pick index 0 for both.
    values = torch.zeros(2, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    rewards = torch.tensor([7.0, -3.0])
    for method in ("td", "mc"):
        targets = bellman_targets(values, mask, rewards, method=method)
        assert targets[0, 2] == 7.0 and targets[1, 4] == -3.0
    td = bellman_targets(values + torch.arange(5.0), mask, rewards, method="td")
    assert td[0, :2].tolist() == [1.0, 2.0] and td[1, :4].tolist() == [1.0, 2.0, 3.0, 4.0]  # V(o_{t+1})


def test_discounted_targets():
    mask = torch.ones(1, 4, dtype=torch.bool)
    mc = bellman_targets(torch.zeros(1, 4), mask, torch.tensor([1.0]), method="mc", gamma=0.5)
    assert mc[0].tolist() == [0.125, 0.25, 0.5, 1.0]
    td = bellman_targets(torch.ones(1, 4), mask, torch.tensor([1.0]), method="td", gamma=0.5)
    assert td[0].tolist() == [0.5, 0.5, 0.5, 1.0]


def test_bootstrapped_target_carries_no_gradient():
    # With V the identity on 1-d states, dL/dV(o_t) must be exactly 2 (V(o_t) - y_t) / N: nothing flows
    # into V(o_{t+1}) through its role as the target of o_t.
    states = torch.tensor([[[0.3], [-0.2], [0.9], [0.4]]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    identity = lambda s: s.squeeze(-1)
    loss = bellman_loss(identity, states, mask, torch.tensor([1.0]), method="td")
    loss.backward()
    v = states.detach().squeeze(-1)[0]
    targets = torch.tensor([v[1], v[2], 1.0, 0.0])
    expected = 2 * (v - targets) * mask[0].float() / 3
    assert torch.allclose(states.grad.squeeze(-1)[0], expected)


def tiny_gpt(seed=0, n_embd=32):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=n_embd)).eval()


def test_checkpoint_round_trip(tmp_path):
    model = tiny_gpt()
    value = ValueFunction(ValueConfig(n_embd=32, n_hidden=3, width=20, activation="tanh"))
    path = tmp_path / "v.pt"
    save_value(str(path), value, "tiny", model, "toy", train_args={"lr": 1e-3})
    loaded, checkpoint = load_value(str(path), model)
    assert loaded.config == value.config and checkpoint["reward"] == "toy" and checkpoint["base_model"] == "tiny"
    assert checkpoint["train_args"] == {"lr": 1e-3}
    o = torch.randn(4, 32)
    assert torch.equal(loaded(o), value(o).detach())
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not list(tmp_path.glob("*.tmp*"))  # the atomic write left no temporary file


def test_checkpoint_for_another_width_is_a_clear_error(tmp_path):
    save_value(str(tmp_path / "v.pt"), ValueFunction(ValueConfig(n_embd=32)), "tiny", tiny_gpt(), "toy")
    with pytest.raises(ValueError, match=r"reads states of width 32.*'tiny'.*has width 48"):
        load_value(str(tmp_path / "v.pt"), tiny_gpt(n_embd=48), "other")


def test_checkpoint_for_another_model_of_the_same_width_is_a_clear_error(tmp_path):
    save_value(str(tmp_path / "v.pt"), ValueFunction(ValueConfig(n_embd=32)), "tiny", tiny_gpt(seed=0), "toy")
    with pytest.raises(ValueError, match="whose weights differ from other"):
        load_value(str(tmp_path / "v.pt"), tiny_gpt(seed=1), "other")


def test_missing_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train one with train_value.py"):
        load_value(str(tmp_path / "nope.pt"))
    torch.save({"something": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="is not a value checkpoint"):
        load_value(str(tmp_path / "x.pt"))
