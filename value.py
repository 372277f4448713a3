"""
The value function V_phi(o_t) (PAPER.md E5) and its Bellman loss (E6), with checkpoints that carry their
architecture and the model they were trained for.
"""

import os
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn

from model import write_atomically

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


@dataclass
class ValueConfig:
    n_embd: int  # d, the width of the states o_t it reads
    n_hidden: int = 2  # hidden layers (the official code uses 2-3)
    width: int = 0  # hidden width; 0 means d
    activation: str = "relu"

    def __post_init__(self):
        self.width = self.width or self.n_embd
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")


class ValueFunction(nn.Module):
    """E5: V_phi(o), an MLP from a state o (..., d) to a scalar (...); always computed in fp32."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        layers, width_in = [], config.n_embd
        for _ in range(config.n_hidden):
            layers += [nn.Linear(width_in, config.width), ACTIVATIONS[config.activation]()]
            width_in = config.width
        layers.append(nn.Linear(width_in, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, o):
        return self.net(o.float()).squeeze(-1)


def last_index(mask):
    """Index of each response's last real state, (B,). Not mask.argmax(): that finds the *first* real one."""
    return mask.long().sum(1) - 1


def bellman_targets(values, mask, rewards, method="td", gamma=1.0):
    """The regression targets of E6 for states (B, T+1) of responses padded on the right.

    td: y_t = gamma * sg[V(o_{t+1})] for t < T, and y_T = R at each response's last real state.
    mc: y_t = gamma^(T - t) * R, the realised (discounted) final reward.
    """
    B, L = values.shape
    last = last_index(mask)  # (B,)
    steps = torch.arange(L, device=values.device)[None, :]  # (1, L)
    if method == "mc":
        return rewards[:, None] * gamma ** (last[:, None] - steps).clamp(min=0).float()
    if method != "td":
        raise ValueError(f"method must be 'td' or 'mc', got {method!r}")
    bootstrap = gamma * values[:, 1:].detach()  # sg[V(o_{t+1})]: the target carries no gradient
    targets = torch.cat([bootstrap, torch.zeros(B, 1, device=values.device)], dim=1)  # (B, L)
    return torch.where(steps == last[:, None], rewards[:, None].float(), targets)


def bellman_loss(value, states, mask, rewards, method="td", gamma=1.0):
    """E6: mean over real states of (V(o_t) - y_t)^2. states (B, T+1, d), mask (B, T+1), rewards (B,)."""
    values = value(states)  # (B, T+1)
    targets = bellman_targets(values, mask, rewards, method, gamma)
    mask = mask.float()
    return (((values - targets) ** 2) * mask).sum() / mask.sum()


# -----------------------------------------------------------------------------
# checkpoints


def model_fingerprint(model):
    """A few numbers of the base model's weights, enough to tell one model from another of the same width."""
    w = model.wte.weight
    return torch.cat([w[:4, :8].flatten(), model.norm_f.weight[:8]]).float().tolist()


def save_value(path, value, base_model_id, model, reward_name, train_args=None, metrics=None):
    """Save V_phi with its architecture, d, the base model it reads and the reward it predicts (atomically)."""
    checkpoint = {"config": asdict(value.config), "state_dict": value.state_dict(),
                  "base_model": base_model_id, "base_fingerprint": model_fingerprint(model),
                  "reward": reward_name, "train_args": train_args or {}, "metrics": metrics or {}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomically(path, lambda tmp: torch.save(checkpoint, tmp))


def load_value(path, model=None, model_id=None):
    """(V_phi in eval mode with frozen weights, checkpoint dict). With `model`, check it was trained for it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"value checkpoint {path} does not exist; train one with train_value.py")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        config = ValueConfig(**checkpoint["config"])
    except Exception as e:
        raise ValueError(f"{path} is not a value checkpoint written by value.py ({type(e).__name__}: {e})") from None
    trained_for = f"{checkpoint['base_model']!r} (reward {checkpoint['reward']!r})"
    if model is not None:
        width = model.config.n_embd
        if width != config.n_embd:
            raise ValueError(f"value checkpoint {path} reads states of width {config.n_embd}, trained for "
                             f"{trained_for}, but {model_id or 'this model'} has width {width}; "
                             "train a value function for this model with train_value.py")
        ours = torch.tensor(model_fingerprint(model))
        if not torch.allclose(ours, torch.tensor(checkpoint["base_fingerprint"]), atol=1e-2, rtol=1e-2):
            raise ValueError(f"value checkpoint {path} was trained for {trained_for}, whose weights differ from "
                             f"{model_id or 'this model'}; train a value function for this model with train_value.py")
    value = ValueFunction(config)
    value.load_state_dict(checkpoint["state_dict"])
    value.requires_grad_(False)  # frozen at test time: E7 differentiates with respect to u only
    return value.eval(), checkpoint
