"""
The value function V_phi(o_t) (docs/method.md, E5) and its Bellman loss (E6): the MLP, the
lambda-returns that join TD(0) and Monte Carlo, the official code's loss as written, and the
yardstick that compares them. Imports torch only (a value checkpoint is read and written by
plumbing/checkpoints.py).
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


@dataclass
class ValueConfig:
    n_embd: int  # d, the width of the states o_t it reads
    n_hidden: int = field(default=2,
                          metadata={"help": "hidden layers of V (the official code uses 2-3)",
                                                "flag": "hidden-layers"})
    width: int = field(default=0, metadata={"help": "hidden width of V (0: the model's width d)"})
    activation: str = field(default="relu", metadata={"help": f"one of {', '.join(ACTIVATIONS)}"})

    def __post_init__(self):
        whole = [name for name in ("n_hidden", "width") if not is_whole(getattr(self, name))]
        problems = [f"{name} must be a whole number >= 0, got {getattr(self, name)}"
                    for name in whole]
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation {self.activation!r} is unknown; choose one of "
                            f"{', '.join(ACTIVATIONS)}")
        if problems:
            raise ValueError("; ".join(problems))
        self.width = self.width or self.n_embd


def is_whole(x):
    return isinstance(x, (int, float)) and x == x and int(x) == x and x >= 0


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
        """(V(o) (B,), dV/do (B, d)) for states o (B, d): the gradient that E7's ascent follows, by
        the chain rule written out, with no autograd graph (which the control would otherwise build
        at every step of every token)."""
        x, pre = o.float(), []
        for layer in self.net:  # forward, keeping each activation's input
            if isinstance(layer, nn.Linear):
                x = layer(x)
            else:
                pre.append(x)
                x = layer(x)
        linears = [layer for layer in self.net if isinstance(layer, nn.Linear)]
        grad = linears[-1].weight.expand(x.shape[0], -1)  # dV/d(last hidden) (B, width)
        # back through each activation and Linear
        for z, linear in zip(reversed(pre), reversed(linears[:-1])):
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
    """Index of each response's last real state, (B,). Not mask.argmax(): that finds the *first*
    real one."""
    return mask.long().sum(1) - 1


def lambda_returns(values, mask, rewards, lam=1.0, gamma=1.0, stop_gradient=True):
    """E6, the TD(lambda) family: the regression target G_t of every state of responses padded on
    the right.

    values (B, L) are V(o_t) of the states o_0 ... o_T (L >= T+1), mask (B, L) marks the real ones,
    rewards (B,). With the reward only at the end, G_T = R and, walking back,
        G_t = gamma * ((1 - lam) * sg[V(o_{t+1})] + lam * G_{t+1}).
    lam = 0 is the paper's TD(0), G_t = gamma * sg[V(o_{t+1})]: one step of bootstrapping, so the
    reward reaches o_t only through the values of the states after it. lam = 1 is Monte Carlo, G_t =
    gamma^(T-t) * R: the realised reward itself. sg[.] (detach) holds the targets fixed, so only
    V(o_t) is pulled towards them; stop_gradient=False lets the gradient flow into the targets too,
    as both official codes do (to measure it).
    """
    B, L = values.shape
    # >>> exercise E6: walk back from each last real state (last_index): G_T = R, G_t from G_{t+1}
    last = last_index(mask)  # (B,)
    bootstrap = values.detach() if stop_gradient else values  # sg[V]
    rewards = rewards.float()
    targets = [None] * L
    G = rewards
    for t in reversed(range(L)):
        if t + 1 < L:
            G = gamma * ((1 - lam) * bootstrap[:, t + 1] + lam * G)
        # G_T = R; states past the end are masked out by the loss
        G = torch.where(t == last, rewards, G)
        targets[t] = G
    return torch.stack(targets, dim=1)  # (B, L)
    # <<< exercise E6


def bellman_loss(value, states, mask, rewards, method="td", lam=1.0, gamma=1.0, stop_gradient=True):
    """E6: the loss V_phi is trained with. states (B, T+1, d), mask (B, T+1), rewards (B,).

    td: mean over real states of (V(o_t) - G_t)^2 with the lambda-returns above (lam = 0: TD(0), 1:
    Monte Carlo);
        stop_gradient=False drops the sg[.] of the targets (a residual-gradient variant, to
        compare).
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

        ( sum over consecutive real pairs (V(o_t) - V(o_{t+1}))^2 + sum_b (V(o_first) - R_b)^2 ) / B

    Two differences from E6: no stop-gradient, so the pair term pulls V(o_t) and V(o_{t+1}) towards
    each other (a "residual gradient" that flattens V along each response), and the reward is
    anchored at the *first* real state, because mask.argmax() returns the first maximum; the last
    state's value is tied to R only through the chain of pairs.
    """
    B = values.shape[0]
    pairs = mask[:, :-1] & mask[:, 1:]  # (B, T)
    consecutive = ((values[:, :-1] - values[:, 1:])[pairs] ** 2).sum()
    first = mask.float().argmax(dim=1)  # (B,) the official code's "last" index
    anchor = ((values[torch.arange(B), first] - rewards.float()) ** 2).sum()
    return (consecutive + anchor) / B


class ValueReport:
    """How well V predicts the realised return, over the real states of held-out responses.

    Comparable across training methods (unlike each method's own loss: a flat V has a small TD
    loss):
    - error: mean over states of (V(o_t) - gamma^(T-t) R)^2; best constant: the same for the best
      flat V;
    - corr: correlation of V(o_t) with the realised return over all states;
    - spread: standard deviation of V over the states (0 for a constant);
    - error_by_position: the error at positions t in buckets (0, 1-3, 4-15, 16-63, 64+, and the
      last state).
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
        for store, x in ((self.v, values), (self.g, returns), (self.pos, positions),
                         (self.is_last, is_last)):
            store.append(x[mask])

    def summary(self):
        if not self.v:
            return {"error": float("nan"), "best_constant": float("nan"), "corr": float("nan"),
                    "spread": float("nan"), "error_by_position": {}}
        v, g, pos, is_last = (torch.cat(x) for x in (self.v, self.g, self.pos, self.is_last))
        squared = (v - g) ** 2
        corr = torch.corrcoef(torch.stack([v, g]))[0,
                                                   1].item() if len(v) > 1 and v.std() > 0 else 0.0
        by_position = {}
        for a, b in self.BUCKETS:
            inside = (pos >= a) & (pos <= b)
            if inside.any():
                name = f"{a}" if a == b else f"{a}-{b}" if b < 10**9 else f"{a}+"
                by_position[name] = squared[inside].mean().item()
        by_position["last"] = squared[is_last].mean().item()
        return {"error": squared.mean().item(), "best_constant": g.var(unbiased=False).item(),
                "corr": corr,
                "spread": v.std(unbiased=False).item(), "error_by_position": by_position}
