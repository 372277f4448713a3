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


def close(tensor, name, hint, tol=1e-5):
    """The snapshot check: `hint` says, in the exercise's terms, what a difference usually means."""
    expected = SNAPSHOTS[name]
    assert tuple(tensor.shape) == expected.shape, f"{name}: shape {tuple(tensor.shape)}, expected {expected.shape}"
    gap = float(np.abs(tensor.detach().float().numpy() - expected).max())
    assert gap <= tol, f"{name} differs from the reference output by up to {gap:.3g}: {hint}"


@pytest.mark.e1
def test_e1_the_cache_gives_the_states_of_a_full_forward_pass():
    model, x = tiny_model(), inputs()
    try:
        cached = adapters.cached_states(model, x["tokens"], prefill=4)
    except ValueError as e:  # the model's own check: more positions than the cache holds
        pytest.fail(f"reading through the cache failed ({e}): write stores this step's k, v after the `length` filled "
                    "slots and returns every filled slot; it leaves `length` alone (the model moves it after all layers)")
    with torch.no_grad():  # property: the memory gives what recomputing everything gives
        assert (cached - model.states(x["tokens"])).abs().max() <= 1e-5, (
            "the states read through the cache differ from a full forward pass: write k and v at the slots "
            "length ... length + T - 1 (after those already filled, not from slot 0), and return every filled "
            "slot, this step's included, and no empty one; the model itself moves `length` after all layers")
    close(cached, "e1_states", "the cache does not give the reference's states")


@pytest.mark.e2
def test_e2_the_head_reads_the_state():
    model, x = tiny_model(), inputs()
    logits = adapters.head(model, x["o"])
    assert (logits - x["o"] @ model.wte.weight.T).abs().max() <= 1e-5, (
        "the head must return the logits W o (W the tied embedding matrix, self.lm_head): no softmax, no second "
        "norm (o is already normed)")
    close(logits, "e2_logits", "the head does not give the reference's logits")


@pytest.mark.e2
def test_e2_a_reward_model_reads_its_score_head():
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    rm = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=16, n_labels=1)).eval()
    o = inputs()["o"]
    try:
        scores = adapters.head(rm, o)
    except AttributeError as e:
        pytest.fail(f"{e}: a reward model (config.n_labels > 0) has no LM head; E2 must read its score head, self.score")
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
            assert response == expected, (
                f"greedy tokens {response}, expected {expected}: each token is the argmax of W edit(o_t), the "
                "head reading the edited state (the edit applied once, to this step's state)")
            # the states the loop went through are the model's own, o_t of each token: the edit is not in them
            assert (s - model.wte(torch.tensor(prompt[-1:] + response))).abs().max() == 0, (
                "the recorded states must be the model's own o_t, read from the tokens: the edit never enters them")
    assert adapters.greedy(model, prompts, 6)[0] == adapters.greedy(model, prompts, 6, edit=lambda o: o)[0], (
        "an edit that changes nothing must give the base model's tokens")


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


@pytest.mark.e3
def test_e3_the_base_logits_are_those_of_the_unedited_state():
    model, o = Memoryless(), inputs()["o"]
    with torch.no_grad():
        plain, edited = model.head(o), model.head(o + 0.5)
    logits, base = adapters.logits(model, o, shift, want_base=True)
    assert base is not None, "with an edit and want_base, return the base model's logits W o_t too (the KL needs them)"
    assert (base - plain).abs().max() <= 1e-6, (
        "the base logits must be W o_t, of the state before the edit: do not overwrite o with edit(o)")
    assert (logits - edited).abs().max() <= 1e-6, "the logits to sample from must be W edit(o_t), the edit applied once"
    logits, base = adapters.logits(model, o, None, want_base=False)
    assert (logits - plain).abs().max() <= 1e-6 and base is logits, (
        "without an edit the logits are W o_t, and they are the base logits too (the same tensor)")


@pytest.mark.e3
def test_e3_the_kl_is_measured_against_the_unedited_model():
    model = Memoryless()
    prompts = inputs()["tokens"][:, :4].tolist()
    tokens, _ = adapters.greedy(model, prompts, 6, edit=shift)
    with torch.no_grad():
        for prompt, response, got in zip(prompts, tokens, adapters.kl(model, prompts, 6, edit=shift)):
            o = model.wte(torch.tensor(prompt[-1:] + response[:-1]))  # (6, C): the state of each decision
            logp, logq = model.head(o + 0.5).log_softmax(-1), model.head(o).log_softmax(-1)
            expected = float((logp.exp() * (logp - logq)).sum(-1).mean())
            assert got == pytest.approx(expected, rel=1e-4), (
                f"the recorded KL is {got}, expected {expected}: it compares the sampled distribution, of W(o + u), "
                "with the base model's, of W o (not with itself, and not softmax probabilities used as logits)")
    assert adapters.kl(model, prompts, 6) == [0.0, 0.0], "without an edit the model is the base model: KL 0"


@pytest.mark.e6
def test_e6_lambda_returns_by_hand():
    # one response of 3 states, values 0.2, 0.4, 0.6 and reward 1: G_2 = R = 1; with lambda 0.5 and gamma 1,
    # G_1 = 0.5 * 0.6 + 0.5 * 1 = 0.8, G_0 = 0.5 * 0.4 + 0.5 * 0.8 = 0.6; TD(0) bootstraps, Monte Carlo is R
    values, mask, reward = torch.tensor([[0.2, 0.4, 0.6]]), torch.ones(1, 3, dtype=torch.bool), torch.tensor([1.0])
    for lam, expected in ((0.0, [0.4, 0.6, 1.0]), (1.0, [1.0, 1.0, 1.0]), (0.5, [0.6, 0.8, 1.0])):
        got = [round(g, 4) for g in adapters.returns(values, mask, reward, lam)[0].tolist()]
        assert got == pytest.approx(expected), (
            f"lambda = {lam}: expected G = {expected}, got {got}. lambda = 0 is TD(0), G_t = V(o_{{t+1}}); lambda = 1 "
            "is Monte Carlo, G_t = R; the last state's target is R itself (are lambda and 1 - lambda swapped, or "
            "V(o_t) used where V(o_{t+1}) belongs?)")


@pytest.mark.e6
def test_e6_discount_by_hand():
    # gamma 0.5, lambda 1: G_t = gamma^(T - t) R, the reward discounted once per step back, not once in all
    values, mask, reward = torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), torch.tensor([1.0])
    got = [round(g, 4) for g in adapters.returns(values, mask, reward, 1.0, gamma=0.5)[0].tolist()]
    assert got == pytest.approx([0.25, 0.5, 1.0]), (
        f"lambda = 1 (Monte Carlo) and gamma = 0.5: G_t must be gamma^(T-t) R = [0.25, 0.5, 1], got {got}: gamma "
        "multiplies the whole step back, G_t = gamma ((1 - lambda) V(o_{t+1}) + lambda G_{t+1}), once per step")


@pytest.mark.e6
def test_e6_lambda_returns_match_the_snapshots():
    x = inputs()
    before = x["values"].clone()
    for lam in (0.0, 0.5, 1.0):
        close(adapters.returns(x["values"], x["mask"], x["rewards"], lam, gamma=0.9)[x["mask"]],
              f"e6_returns_{lam}_real", f"the lambda-returns for lambda = {lam}, gamma = 0.9 on a right-padded batch "
              "(its second response ends at index 2) differ: G_T = R at each response's own last real state, "
              "G_t = gamma ((1 - lambda) V(o_{t+1}) + lambda G_{t+1}) before it")
    assert torch.equal(x["values"], before), "lambda_returns changed the caller's values tensor in place"


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


class Table(torch.nn.Module):
    """A value function that ignores the states and returns a table of numbers: V(o_t) by hand."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.nn.Parameter(torch.tensor(values))

    def forward(self, states):
        return self.values


@pytest.mark.e6
def test_e6_the_loss_by_hand():
    # values 0.2, 0.4 and a padded 9.0, reward 1, Monte Carlo: ((0.2 - 1)^2 + (0.4 - 1)^2) / 2 = 0.5
    mask, states = torch.tensor([[True, True, False]]), torch.zeros(1, 3, 4)
    got = adapters.loss(Table([[0.2, 0.4, 9.0]]), states, mask, torch.tensor([1.0]), 1.0).item()
    assert got == pytest.approx(0.5), (
        f"expected ((0.2 - 1)^2 + (0.4 - 1)^2) / 2 = 0.5, got {got}: the mean is over the real states only (the "
        "padding after a response's end counts neither in the sum nor in the count)")


@pytest.mark.e6
def test_e6_the_loss_gradient_reaches_v_of_o_t_only():
    # TD(0): targets G = [0.4, 0.6, 1] held fixed, so d loss / d V(o_t) = 2 (V(o_t) - G_t) / 3
    table = Table([[0.2, 0.4, 0.6]])
    adapters.loss(table, torch.zeros(1, 3, 4), torch.ones(1, 3, dtype=torch.bool), torch.tensor([1.0]), 0.0).backward()
    expected = [round(2 * (v - g) / 3, 4) for v, g in ((0.2, 0.4), (0.4, 0.6), (0.6, 1.0))]
    got = [round(g, 4) for g in table.values.grad[0].tolist()]
    assert got == pytest.approx(expected), (
        f"the gradient of the TD(0) loss (lambda = 0) in V(o_0), V(o_1), V(o_2) should be {expected}, got {got}: "
        "the targets are lambda_returns at the lambda asked for, held fixed (sg[.]) so that only V(o_t) is pulled")


@pytest.mark.e6
def test_e6_the_loss_matches_the_snapshots():
    x, value = inputs(), tiny_value()
    for lam in (0.0, 0.5, 1.0):
        close(adapters.loss(value, x["states"], x["mask"], x["rewards"], lam), f"e6_loss_{lam}",
              f"the TD(lambda) loss for lambda = {lam} differs: the mean over the real states only of "
              "(V(o_t) - G_t)^2, with G_t from lambda_returns at this lambda")


@pytest.mark.e7
def test_e7_one_ascent_step_follows_the_gradient_of_v():
    value, o = tiny_value(), inputs()["o"]
    assert adapters.control(value, o, step_size=0.5, n_steps=0).abs().max() == 0, "n = 0 steps: u = 0, the base model"
    before = o.clone()
    u = adapters.control(value, o, step_size=0.1, n_steps=1)
    assert torch.equal(o, before), "control changed the caller's states o in place: build u, leave o alone"
    eps = 1e-3  # property: u = alpha * dV/do, by central differences
    numeric = torch.stack([(value(o + eps * e) - value(o - eps * e)) / (2 * eps) for e in torch.eye(16)], dim=1)
    assert (u - 0.1 * numeric).abs().max() <= 1e-4, (
        "one step from u = 0 must be alpha * dV/do (checked by central differences): is it an ascent (+, not -), "
        "scaled by the step size alpha, of V's gradient at o + u?")


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
        f"two steps with alpha 0.5, l2 0.1 give u = {expected} everywhere, got {[round(x, 4) for x in u[0].tolist()]}: each step "
        "is u <- u + alpha (grad V(o + u) - 2 l2 u); check the penalty's factor 2 and its sign, and that "
        "the gradient is taken afresh at every step")
    u = adapters.control(LinearValue(), o, step_size=0.5, n_steps=3)
    assert (u - 1.5).abs().max() <= 1e-6, (
        f"three steps of alpha 0.5 on a V whose gradient is 1 give u = 1.5, got {[round(x, 4) for x in u[0].tolist()]}: is a "
        "gradient left over from the step before added again (not zeroed between steps)?")


@pytest.mark.e7
def test_e7_five_steps_match_the_snapshot():
    close(adapters.control(tiny_value(), inputs()["o"], step_size=0.3, n_steps=5, l2=0.1), "e7_u",
          "five steps with alpha 0.3 and l2 0.1 give another u: each step is u <- u + alpha (grad V(o + u) - 2 l2 u)")


@pytest.mark.e8
def test_e8_diversity_by_hand():
    got = adapters.diversity([[1, 2, 3, 4, 5]])
    assert got == 1.0, f"nothing repeats in [1, 2, 3, 4, 5]: its diversity is 1, got {got}"
    got = adapters.diversity([[1, 2, 1, 2, 1, 2]])
    assert got == pytest.approx(2 / 15), (
        f"[1, 2, 1, 2, 1, 2] has 2 unique 2-grams of 5, 2 unique 3-grams of 4 and 2 unique 4-grams of 3, so "
        f"0.4 * 0.5 * 2/3 = 2/15 = 0.1333; got {got}: n runs over 2, 3, 4, a response of L tokens has L - n + 1 "
        "n-grams, and the three ratios multiply")
    got = adapters.diversity([[7], [1, 2, 3, 4, 5]])
    assert got == 1.0, f"a response too short for any n-gram has nothing against it (it counts 1), got {got}"


@pytest.mark.e8
def test_e8_the_mean_is_over_responses_of_any_length():
    # each response's own product, then the mean over responses; a response too short for any n-gram counts 1
    got = adapters.diversity([[1, 2, 1, 2, 1, 2], [1, 2, 3, 4, 5], [7]])
    assert got == pytest.approx((2 / 15 + 1 + 1) / 3), (
        f"expected the mean of 2/15, 1 and 1 (each response's own product), got {got}: n-grams are not "
        "pooled over responses, and short responses are not left out of the mean")


@pytest.mark.e6
def test_e6_training_on_gamblers_ruin_recovers_the_true_values():
    # a fair walk from 2 on 0..4, R = +1 at 4 and -1 at 0: the true value of state s is (s - 2) / 2
    learned = learned_gamblers_ruin_values(lambda value, *batch: adapters.loss(value, *batch, lam=0.5))
    assert (learned - TRUE_VALUES).abs().max() < 0.1, (
        f"TD(0.5) on gambler's ruin learned V = {[round(v, 2) for v in learned.tolist()]}, the true values are "
        f"{TRUE_VALUES.tolist()}: check the targets (held fixed, R at each walk's own end) and the mean over real states")
