"""
The value function V_phi(o_t) (docs/method.md, E5) and its Bellman loss (E6), with checkpoints that carry their
architecture and the model they were trained for.
"""

import os
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn

from checkpoints import write_atomically
from cli import is_whole, require

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


@dataclass
class ValueConfig:
    n_embd: int  # d, the width of the states o_t it reads
    n_hidden: int = 2  # hidden layers (the official code uses 2-3)
    width: int = 0  # hidden width; 0 means d
    activation: str = "relu"

    def __post_init__(self):
        require((self.activation in ACTIVATIONS,
                 f"--activation {self.activation!r} is unknown; choose one of {', '.join(ACTIVATIONS)}"),
                (is_whole(self.n_hidden, 0), f"--hidden-layers must be a whole number >= 0, got {self.n_hidden}"),
                (is_whole(self.width, 0),
                 f"--width must be a whole number >= 0 (0: the model's width), got {self.width}"))
        self.width = self.width or self.n_embd


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

    def value_and_gradient(self, o):
        """(V(o) (B,), dV/do (B, d)) for states o (B, d): the gradient that E7's ascent follows, by the chain rule
        written out, with no autograd graph (which the control would otherwise build at every step of every token)."""
        x, pre = o.float(), []
        for layer in self.net:  # forward, keeping each activation's input
            if isinstance(layer, nn.Linear):
                x = layer(x)
            else:
                pre.append(x)
                x = layer(x)
        linears = [layer for layer in self.net if isinstance(layer, nn.Linear)]
        grad = linears[-1].weight.expand(x.shape[0], -1)  # dV/d(last hidden) (B, width)
        for z, linear in zip(reversed(pre), reversed(linears[:-1])):  # back through each activation and Linear
            grad = (grad * activation_derivative(self.config.activation, z)) @ linear.weight
        return x.squeeze(-1), grad


def activation_derivative(name, z):
    """d act(z) / dz, elementwise, for the activations V may use."""
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "tanh":
        return 1 - torch.tanh(z) ** 2
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    cdf = 0.5 * (1 + torch.erf(z / 2 ** 0.5))  # gelu (exact): Phi(z) + z phi(z)
    return cdf + z * torch.exp(-0.5 * z ** 2) / (2 * torch.pi) ** 0.5


def last_index(mask):
    """Index of each response's last real state, (B,). Not mask.argmax(): that finds the *first* real one."""
    return mask.long().sum(1) - 1


def lambda_returns(values, mask, rewards, lam=1.0, gamma=1.0, stop_gradient=True):
    """E6, the TD(lambda) family: the regression target G_t of every state of responses padded on the right.

    values (B, L) are V(o_t) of the states o_0 ... o_T (L >= T+1), mask (B, L) marks the real ones, rewards (B,).
    With the reward only at the end, G_T = R and, walking back,
        G_t = gamma * ((1 - lam) * sg[V(o_{t+1})] + lam * G_{t+1}).
    lam = 0 is the paper's TD(0), G_t = gamma * sg[V(o_{t+1})]: one step of bootstrapping, so the reward reaches
    o_t only through the values of the states after it. lam = 1 is Monte Carlo, G_t = gamma^(T-t) * R: the
    realised reward itself. sg[.] (detach) holds the targets fixed, so only V(o_t) is pulled towards them;
    stop_gradient=False lets the gradient flow into the targets too, as both official codes do (to measure it).
    """
    B, L = values.shape
    # >>> exercise E6: walk back from each response's last real state (last_index): G_T = R, then G_t from G_{t+1}
    last = last_index(mask)  # (B,)
    bootstrap = values.detach() if stop_gradient else values  # sg[V]
    rewards = rewards.float()
    targets = [None] * L
    G = rewards
    for t in reversed(range(L)):
        if t + 1 < L:
            G = gamma * ((1 - lam) * bootstrap[:, t + 1] + lam * G)
        G = torch.where(t == last, rewards, G)  # G_T = R; states past the end are masked out by the loss
        targets[t] = G
    return torch.stack(targets, dim=1)  # (B, L)
    # <<< exercise E6


def bellman_loss(value, states, mask, rewards, method="td", lam=1.0, gamma=1.0, stop_gradient=True):
    """E6: the loss V_phi is trained with. states (B, T+1, d), mask (B, T+1), rewards (B,).

    td: mean over real states of (V(o_t) - G_t)^2 with the lambda-returns above (lam = 0: TD(0), 1: Monte Carlo);
        stop_gradient=False drops the sg[.] of the targets (a residual-gradient variant, for comparison).
    official: the loss of the official RE-Control training script, as written (see official_loss).
    """
    values = value(states)  # (B, T+1)
    if method == "official":
        return official_loss(values, mask, rewards)
    if method != "td":
        raise ValueError(f"method must be 'td' or 'official', got {method!r}")
    # >>> exercise E6: the mean over real states (mask) of (V(o_t) - G_t)^2, G_t from lambda_returns
    targets = lambda_returns(values, mask, rewards, lam, gamma, stop_gradient)
    mask = mask.float()
    return (((values - targets) ** 2) * mask).sum() / mask.sum()
    # <<< exercise E6


def official_loss(values, mask, rewards):
    """The official code's value loss, transcribed: per batch of B responses,

        ( sum over consecutive real pairs (V(o_t) - V(o_{t+1}))^2  +  sum_b (V(o_first) - R_b)^2 ) / B

    Two differences from E6: no stop-gradient, so the pair term pulls V(o_t) and V(o_{t+1}) towards each other (a
    "residual gradient" that flattens V along each response), and the reward is anchored at the *first* real
    state, because mask.argmax() returns the first maximum; the last state's value is tied to R only through the
    chain of pairs.
    """
    B = values.shape[0]
    pairs = mask[:, :-1] & mask[:, 1:]  # (B, T)
    consecutive = ((values[:, :-1] - values[:, 1:])[pairs] ** 2).sum()
    first = mask.float().argmax(dim=1)  # (B,) the official code's "last" index
    anchor = ((values[torch.arange(B), first] - rewards.float()) ** 2).sum()
    return (consecutive + anchor) / B


class ValueReport:
    """How well V predicts the realised return, over the real states of held-out responses.

    Comparable across training methods (unlike each method's own loss: a flat V has a small TD loss):
    - error: mean over states of (V(o_t) - gamma^(T-t) R)^2; best constant: the same for the best flat V;
    - corr: correlation of V(o_t) with the realised return over all states;
    - spread: standard deviation of V over the states (0 for a constant);
    - error_by_position: the error at positions t in buckets (0, 1-3, 4-15, 16-63, 64+, and the last state).
    """

    BUCKETS = [(0, 0), (1, 3), (4, 15), (16, 63), (64, 10**9)]

    def __init__(self, gamma=1.0):
        self.gamma, self.v, self.g, self.pos, self.is_last = gamma, [], [], [], []

    @torch.no_grad()
    def add(self, value, states, mask, rewards):
        values = value(states)  # (B, L)
        returns = lambda_returns(values, mask, rewards, lam=1.0, gamma=self.gamma)
        positions = torch.arange(mask.shape[1], device=mask.device)[None, :].expand_as(mask)
        is_last = positions == last_index(mask)[:, None]
        for store, x in ((self.v, values), (self.g, returns), (self.pos, positions), (self.is_last, is_last)):
            store.append(x[mask])

    def summary(self):
        if not self.v:
            return {"error": float("nan"), "best_constant": float("nan"), "corr": float("nan"), "spread": float("nan"),
                    "error_by_position": {}}
        v, g, pos, is_last = (torch.cat(x) for x in (self.v, self.g, self.pos, self.is_last))
        squared = (v - g) ** 2
        corr = torch.corrcoef(torch.stack([v, g]))[0, 1].item() if len(v) > 1 and v.std() > 0 else 0.0
        by_position = {f"{a}" if a == b else f"{a}-{b}" if b < 10**9 else f"{a}+": squared[(pos >= a) & (pos <= b)].mean().item()
                       for a, b in self.BUCKETS if ((pos >= a) & (pos <= b)).any()}
        by_position["last"] = squared[is_last].mean().item()
        return {"error": squared.mean().item(), "best_constant": g.var(unbiased=False).item(), "corr": corr,
                "spread": v.std(unbiased=False).item(), "error_by_position": by_position}



# -----------------------------------------------------------------------------
# checkpoints


def model_fingerprint(model):
    """A few numbers of the base model's weights, enough to tell one model from another of the same width."""
    w = model.wte.weight
    return torch.cat([w[:4, :8].flatten(), model.norm_f.weight[:8]]).float().tolist()


def made_by(base_model_id, model, reward_name, train_args=None):
    """What a value checkpoint records of the job that made it: the base model (its name and a fingerprint of its
    weights), the reward, and the training settings. A rerun of the same job may replace it; nothing else may."""
    return {"base_model": base_model_id, "base_fingerprint": model_fingerprint(model), "reward": reward_name,
            "train_args": train_args or {}}


def read_made_by(path):
    """made_by of the value checkpoint at `path` (an error if it is not one)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return {key: checkpoint[key] for key in ("base_model", "base_fingerprint", "reward", "train_args")}


def save_value(path, value, base_model_id, model, reward_name, train_args=None, metrics=None, control=None):
    """Save V_phi with its architecture, d, the base model it reads and the reward it predicts (atomically);
    `control`: the settings of E7 calibrated for it (step_size, n_steps, target, and the curve they came from)."""
    checkpoint = {"config": asdict(value.config), "state_dict": value.state_dict(),
                  **made_by(base_model_id, model, reward_name, train_args), "metrics": metrics or {},
                  "control": control or {}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomically(path, lambda tmp: torch.save(checkpoint, tmp))
    return checkpoint


def load_value(path, model=None, model_id=None, reward=None):
    """(V_phi in eval mode with frozen weights, checkpoint dict). With `model` (and `reward`), check that it was
    trained for that model's states (and to predict that reward), and put V on the model's device."""
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
    if reward is not None and reward != checkpoint["reward"]:
        raise ValueError(f"value checkpoint {path} predicts the reward {checkpoint['reward']!r}, not {reward!r}; "
                         f"pass --reward {checkpoint['reward']}, or train a value function for {reward!r}")
    value = ValueFunction(config)
    value.load_state_dict(checkpoint["state_dict"])
    value.requires_grad_(False)  # frozen at test time: E7 differentiates with respect to u only
    if model is not None:  # on the device of the states it reads (in fp32 whatever the model's dtype)
        value.to(model.wte.weight.device)
    return value.eval(), checkpoint
