"""E5/E6: the value network, its Bellman loss on a problem with known values, and its checkpoints."""

import random

import pytest
import torch

from model import GPT, GPTConfig
from plumbing.checkpoints import load_value, save_value, value_provenance
from value import ValueConfig, ValueFunction, ValueReport, bellman_loss, lambda_returns

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


def learned_gamblers_ruin_values(loss_of):
    """V of the 5 states after 400 Adam steps on loss_of(value, states, mask, rewards), fixed seeds."""
    torch.manual_seed(0)
    rng = random.Random(0)
    value = ValueFunction(ValueConfig(n_embd=5, n_hidden=1, width=16))
    optimizer = torch.optim.Adam(value.parameters(), lr=1e-2)
    for step in range(400):
        loss = loss_of(value, *gamblers_ruin_batch(64, rng))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return value(torch.eye(5))


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_bellman_training_recovers_the_true_values(lam):
    learned = learned_gamblers_ruin_values(lambda *batch: bellman_loss(*batch, lam=lam))
    assert (learned - TRUE_VALUES).abs().max() < 0.1, learned


def test_terminal_target_sits_at_each_responses_last_real_state():
    # Two responses of 3 and 5 states. The official code's mask.argmax() would pick index 0 for both.
    values = torch.zeros(2, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    rewards = torch.tensor([7.0, -3.0])
    for lam in (0.0, 0.5, 1.0):
        targets = lambda_returns(values, mask, rewards, lam=lam)
        assert targets[0, 2] == 7.0 and targets[1, 4] == -3.0


def test_lambda_zero_is_td0_and_lambda_one_is_monte_carlo_exactly():
    torch.manual_seed(0)
    values = torch.randn(3, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    rewards = torch.tensor([0.7, -0.3, 0.1])
    last = mask.sum(1) - 1
    for gamma in (1.0, 0.5):
        td0 = lambda_returns(values, mask, rewards, lam=0.0, gamma=gamma)
        mc = lambda_returns(values, mask, rewards, lam=1.0, gamma=gamma)
        for b in range(3):
            T = int(last[b])
            assert torch.equal(td0[b, :T], gamma * values[b, 1:T + 1])  # gamma * V(o_{t+1})
            assert td0[b, T] == rewards[b]
            expected = rewards[b] * gamma ** (T - torch.arange(T + 1.0))  # gamma^(T - t) R
            assert torch.equal(mc[b, :T + 1], expected)


def test_intermediate_lambda_matches_lambda_returns_by_hand():
    # One 3-step trajectory o_0 o_1 o_2 o_3, reward R at o_3, lambda = 0.5, gamma = 0.9:
    # G_3 = R, G_2 = g((1-l) V3 + l G_3), G_1 = g((1-l) V2 + l G_2), G_0 = g((1-l) V1 + l G_1).
    V = [0.2, -0.4, 0.6, 0.1]
    R, l, g = 1.0, 0.5, 0.9
    G3 = R
    G2 = g * ((1 - l) * V[3] + l * G3)
    G1 = g * ((1 - l) * V[2] + l * G2)
    G0 = g * ((1 - l) * V[1] + l * G1)
    targets = lambda_returns(torch.tensor([V]), torch.ones(1, 4, dtype=torch.bool), torch.tensor([R]), lam=l, gamma=g)
    assert torch.allclose(targets[0], torch.tensor([G0, G1, G2, G3]), atol=1e-6)
    # and it is the textbook definition from o_0: the n-step returns g^n V(o_n), n = 1, 2, 3, weighted
    # (1 - l) l^(n-1), and the full return g^3 R (the target of the last state) with the remaining weight l^3
    n_step = [g * V[1], g ** 2 * V[2], g ** 3 * V[3]]
    by_definition = sum((1 - l) * l ** n * G for n, G in enumerate(n_step)) + l ** 3 * g ** 3 * R
    assert abs(targets[0, 0].item() - by_definition) < 1e-6


def test_bootstrapped_target_carries_no_gradient():
    # With V the identity on 1-d states, dL/dV(o_t) must be exactly 2 (V(o_t) - y_t) / N: nothing flows
    # into V(o_{t+1}) through its role as the target of o_t.
    states = torch.tensor([[[0.3], [-0.2], [0.9], [0.4]]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    identity = lambda s: s.squeeze(-1)
    for lam in (0.0, 0.6):
        states.grad = None
        bellman_loss(identity, states, mask, torch.tensor([1.0]), lam=lam).backward()
        v = states.detach().squeeze(-1)[0]
        targets = lambda_returns(v[None], mask, torch.tensor([1.0]), lam=lam)[0]
        expected = 2 * (v - targets) * mask[0].float() / 3
        assert torch.allclose(states.grad.squeeze(-1)[0], expected)


def test_official_loss_is_the_official_formula_as_written():
    # A direct transcription on a fixed batch: pairs of consecutive real states without stop-gradient, the reward
    # anchored at the first real state (mask.argmax), both summed and divided by the batch size.
    torch.manual_seed(0)
    states = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    rewards = torch.tensor([1.0, -0.5, 0.25])
    value = ValueFunction(ValueConfig(n_embd=4, n_hidden=1, width=8))
    v = value(states)
    pair, anchor = 0.0, 0.0
    for b in range(3):
        n = int(mask[b].sum())
        pair += sum((v[b, t] - v[b, t + 1]) ** 2 for t in range(n - 1))
        anchor += (v[b, 0] - rewards[b]) ** 2
    expected = (pair + anchor) / 3
    loss = bellman_loss(value, states, mask, rewards, method="official")
    assert torch.allclose(loss, expected)
    # no stop-gradient: the gradient of the pair term reaches V(o_{t+1}) as well
    identity = lambda s: s.squeeze(-1)
    x = torch.tensor([[[0.0], [1.0]]], requires_grad=True)
    bellman_loss(identity, x, torch.ones(1, 2, dtype=torch.bool), torch.tensor([0.0]), method="official").backward()
    assert x.grad.squeeze().tolist() == [-2.0, 2.0]  # d/dV0 [(V0-V1)^2 + V0^2] = -2 at (0, 1); d/dV1 = +2


def test_value_report_scores_a_flat_value_as_the_best_constant():
    states, mask, rewards = gamblers_ruin_batch(200, random.Random(1))
    def report_of(value):
        report = ValueReport()
        report.add(value, states, mask, rewards)
        return report.summary()

    report = report_of(lambda s: torch.zeros(s.shape[:-1]))
    assert report["spread"] == 0 and report["corr"] == 0
    assert abs(report["error"] - report["best_constant"]) < 0.01  # mean R is near 0 by symmetry
    truth = report_of(lambda s: s @ TRUE_VALUES)
    assert truth["error"] < 0.8 * report["error"] and truth["corr"] > 0.4
    assert truth["error_by_position"]["last"] == 0  # the true value of a final position is its reward


def tiny_gpt(seed=0, n_embd=32):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=n_embd)).eval()


def test_checkpoint_round_trip(tmp_path):
    model = tiny_gpt()
    value = ValueFunction(ValueConfig(n_embd=32, n_hidden=3, width=20, activation="tanh"))
    path = tmp_path / "v.pt"
    save_value(str(path), value, value_provenance("tiny", model, "toy", train_args={"lr": 1e-3}))
    loaded, checkpoint = load_value(str(path), model)
    assert loaded.config == value.config and checkpoint["reward"] == "toy" and checkpoint["base_model"] == "tiny"
    assert checkpoint["train_args"] == {"lr": 1e-3}
    o = torch.randn(4, 32)
    assert torch.equal(loaded(o), value(o).detach())
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not list(tmp_path.glob("*.tmp*"))  # the atomic write left no temporary file


def test_checkpoint_for_another_width_is_a_clear_error(tmp_path):
    save_value(str(tmp_path / "v.pt"), ValueFunction(ValueConfig(n_embd=32)), value_provenance("tiny", tiny_gpt(), "toy"))
    with pytest.raises(ValueError, match=r"reads states of width 32.*'tiny'.*has width 48"):
        load_value(str(tmp_path / "v.pt"), tiny_gpt(n_embd=48), "other")


def test_checkpoint_for_another_model_of_the_same_width_is_a_clear_error(tmp_path):
    save_value(str(tmp_path / "v.pt"), ValueFunction(ValueConfig(n_embd=32)),
               value_provenance("tiny", tiny_gpt(seed=0), "toy"))
    with pytest.raises(ValueError, match="whose weights differ from other"):
        load_value(str(tmp_path / "v.pt"), tiny_gpt(seed=1), "other")


def test_missing_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train one with train_value.py"):
        load_value(str(tmp_path / "nope.pt"))
    torch.save({"something": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="is not a value checkpoint"):
        load_value(str(tmp_path / "x.pt"))


def test_without_stop_gradient_the_targets_carry_gradient():
    # TD(0) on one 2-state response with V the identity: with sg, dL/dV1 comes from the terminal term only;
    # without it, the pair term (V0 - V1)^2 also pushes V1 towards V0.
    identity = lambda s: s.squeeze(-1)
    mask, reward = torch.ones(1, 2, dtype=torch.bool), torch.tensor([1.0])
    grads = []
    for sg in (True, False):
        x = torch.tensor([[[0.0], [0.5]]], requires_grad=True)
        bellman_loss(identity, x, mask, reward, lam=0.0, stop_gradient=sg).backward()
        grads.append(x.grad.squeeze().tolist())
    # L = ((V0 - V1)^2 + (V1 - 1)^2) / 2
    assert grads[0] == [-0.5, -0.5]  # dV0: (V0 - V1) = -0.5; dV1: (V1 - 1) = -0.5, the target V1 held fixed
    assert grads[1] == [-0.5, 0.0]  # dV1 adds -(V0 - V1) = +0.5
