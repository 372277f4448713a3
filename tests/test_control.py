"""E7: the controller, against finite differences and the base model, and its place in the sampling loop."""

import pytest
import torch

from generate import SamplingConfig, sample
from model import GPT, GPTConfig
from control import ControlConfig, Controller
from value import ValueConfig, ValueFunction


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=48, n_layer=2, n_head=2, n_embd=32)).eval()


@pytest.fixture
def value():
    torch.manual_seed(1)
    v = ValueFunction(ValueConfig(n_embd=32, activation="tanh"))
    return v.requires_grad_(False)


PROMPTS = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]


@pytest.mark.parametrize("alpha,n", [(0.0, 30), (0.5, 0)])
def test_zero_control_is_exactly_the_base_model(model, value, alpha, n):
    base = sample(model, PROMPTS, SamplingConfig(max_new_tokens=12, eos_ids=[]), seed=4, record_states=True)
    ctrl = sample(model, PROMPTS, SamplingConfig(max_new_tokens=12, eos_ids=[]), seed=4, record_states=True, edit=Controller(value, ControlConfig(alpha, n)))
    assert ctrl.tokens == base.tokens
    o = torch.cat(base.states)
    assert torch.equal(model.head(Controller(value, ControlConfig(alpha, n))(o)), model.head(o))


def test_one_step_follows_the_finite_difference_gradient(value):
    o = torch.randn(3, 32, dtype=torch.float64).float()
    u = Controller(value, ControlConfig(step_size=0.1, n_steps=1)).control(o)
    eps = 1e-3
    fd = torch.zeros_like(o)
    for j in range(32):
        e = torch.zeros(32)
        e[j] = eps
        fd[:, j] = (value(o + e) - value(o - e)) / (2 * eps)
    assert torch.allclose(u, 0.1 * fd, atol=1e-4)


def test_l2_penalty_enters_the_gradient(value):
    o = torch.randn(2, 32)
    c = Controller(value, ControlConfig(step_size=0.1, n_steps=2, l2=3.0))
    u1 = Controller(value, ControlConfig(0.1, 1)).control(o)
    with torch.enable_grad():
        u = u1.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(value(o + u).sum(), u)
    assert torch.allclose(c.control(o), u1 + 0.1 * (g - 2 * 3.0 * u1), atol=1e-6)


def test_value_rises_over_the_steps_for_a_small_step_size(value):
    o = torch.randn(5, 32)
    values = [value(o + Controller(value, ControlConfig(0.05, n)).control(o)) if n else value(o) for n in range(8)]
    for before, after in zip(values, values[1:]):
        assert (after > before).all()


def test_radius_bounds_u_relative_to_the_state(value):
    o = torch.randn(4, 32) * torch.tensor([[0.5], [1.0], [2.0], [4.0]])
    u = Controller(value, ControlConfig(1000.0, 20, radius=0.3)).control(o)
    ratio = u.norm(dim=-1) / o.norm(dim=-1)
    assert (ratio <= 0.3 + 1e-5).all() and (ratio > 0.29).all()  # a large step size ends on the sphere


def test_only_the_newest_position_is_edited_and_the_cache_never_sees_u(model, value):
    seen = []
    controller = Controller(value, ControlConfig(2.0, 10))

    def spy(o):
        seen.append(o.shape)
        return controller(o)
    caches = []
    new_cache = model.new_cache
    model.new_cache = lambda *a: caches.append(new_cache(*a)) or caches[-1]
    out = sample(model, PROMPTS, SamplingConfig(max_new_tokens=10, eos_ids=[]), seed=0, edit=spy)
    del model.new_cache
    assert seen and all(s == (3, 32) for s in seen)  # (B, C): one state per row, never the prompt positions
    # the cache holds exactly what a plain forward over prompt + generated tokens writes
    from model import left_pad
    full = [p + t for p, t in zip(PROMPTS, out.tokens)]
    idx, mask = left_pad(full, "cpu")
    reference = model.new_cache(3, idx.shape[1])
    with torch.no_grad():
        model.states(idx, reference, mask)
    n = idx.shape[1] - 1  # the last sampled token is never fed back
    assert torch.allclose(caches[0].k[:, :, :, :n], reference.k[:, :, :, :n], atol=1e-5)
    assert torch.allclose(caches[0].v[:, :, :, :n], reference.v[:, :, :, :n], atol=1e-5)


def test_control_runs_in_fp32_for_a_bf16_model(model, value):
    o = torch.randn(2, 32).to(torch.bfloat16)
    seen = []
    value.net[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))  # what V's first layer reads
    out = Controller(value, ControlConfig(0.5, 3))(o)
    assert out.dtype == torch.bfloat16 and set(seen) == {torch.float32}


def test_batched_control_equals_one_by_one(model, value):
    controller = Controller(value, ControlConfig(1.0, 5))
    batch = sample(model, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=0, eos_ids=[]), edit=controller)
    for i, p in enumerate(PROMPTS):
        assert sample(model, [p], SamplingConfig(max_new_tokens=8, temperature=0, eos_ids=[]), edit=controller).tokens[0] == batch.tokens[i]


@pytest.mark.parametrize("kwargs,match", [(dict(step_size=-0.1), r"^step_size must be a number >= 0, got -0.1$"),
                                          (dict(n_steps=-1), r"^n_steps must be a whole number >= 0"),
                                          (dict(l2=-1.0), r"^l2 must be a number >= 0"),
                                          (dict(radius=0.0), r"^radius must be > 0")])
def test_bad_control_settings_are_clear_errors(value, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Controller(value, ControlConfig(**kwargs))


class Linear(torch.nn.Module):
    """V(o) = w . o: each ascent step of size alpha raises V by exactly alpha * ||w||^2."""

    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, o):
        return o.float() @ self.w


def test_target_stops_the_ascent_at_the_first_step_where_v_reaches_it():
    w = torch.tensor([3.0, 4.0])  # ||w||^2 = 25
    o = torch.tensor([[0.0, 0.0], [1.0, 1.0]])  # V = 0 and V = 7
    controller = Controller(Linear(w), ControlConfig(step_size=0.01, n_steps=10, target=0.6))  # each step adds 0.25 to V
    u = controller.control(o)
    # row 0: V goes 0 -> 0.25 -> 0.5 -> 0.75 and stops after the third step; row 1 starts above the target
    assert torch.allclose(o[0] @ w + u[0] @ w, torch.tensor(0.75))
    assert torch.equal(u[1], torch.zeros(2)) and int(controller.steps_taken) == 3


def test_without_a_target_the_ascent_takes_all_n_steps(value):
    o = torch.randn(4, 32)
    fixed = Controller(value, ControlConfig(0.3, 7)).control(o)
    unreachable = Controller(value, ControlConfig(0.3, 7, target=1e9))
    assert torch.equal(unreachable.control(o), fixed) and int(unreachable.steps_taken) == 4 * 7


def test_controller_refuses_nonsense_settings(value):
    for kwargs in ({"step_size": float("nan")}, {"n_steps": 2.5}, {"target": float("nan")}, {"radius": float("nan")}):
        with pytest.raises(ValueError):
            Controller(value, ControlConfig(**{"step_size": 0.1, "n_steps": 3, **kwargs}))


def test_control_settings_come_from_the_flags_then_the_checkpoint_then_the_paper():
    stored = {"step_size": 3.2, "n_steps": 20, "radius": 0.5, "target": 0.7}  # as train_value.py stores them
    assert ControlConfig.chosen({}) == ControlConfig(step_size=0.5, n_steps=30)
    assert ControlConfig.chosen(stored) == ControlConfig(step_size=3.2, n_steps=20, radius=0.5, target=0.7)
    flags = ControlConfig.chosen(stored, step_size=1.0, radius=float("inf"), target="none", l2=0.1)
    assert flags == ControlConfig(step_size=1.0, n_steps=20, l2=0.1, radius=float("inf"), target=None)
    assert ControlConfig.chosen(stored, target="0.25").target == 0.25
    with pytest.raises(ValueError, match="^target must be a number, 'none' or 'auto', got 'high'"):
        ControlConfig.chosen(stored, target="high")
    assert ControlConfig(step_size=3.2, n_steps=20).with_total(64) == ControlConfig(step_size=3.2, n_steps=20)
    assert ControlConfig(n_steps=0).with_total(8) == ControlConfig(step_size=8.0, n_steps=1)


@pytest.mark.parametrize("activation", ["relu", "tanh", "silu", "gelu"])
def test_closed_form_gradient_of_v_equals_autograd(activation):
    torch.manual_seed(0)
    value = ValueFunction(ValueConfig(n_embd=32, width=24, activation=activation)).requires_grad_(False)
    o = torch.randn(6, 32)
    x = o.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(value(x).sum(), x)
    v, gradient = value.value_and_gradient(o)
    assert torch.equal(v, value(o)) and (gradient - expected).abs().max() <= 1e-5
    fast = Controller(value, ControlConfig(0.3, 10, l2=0.1))
    slow = Controller(lambda z: value(z), ControlConfig(0.3, 10, l2=0.1))  # a plain callable: the autograd path
    assert (fast.control(o) - slow.control(o)).abs().max() <= 1e-5
