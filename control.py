"""
The controller of RE-Control (docs/method.md, E7): at every decoding step, gradient ascent on the
value V_phi(o_t + u) moves the newest state o_t by u before the LM head reads it (E3).

It plugs into generate.sample as its `edit`, so plain and controlled sampling share one loop, and u
never enters the KV cache. How strong it may be (the radius) is chosen on validation prompts by
train_value.py. Imports torch only.
"""

import math
from dataclasses import dataclass, field, replace

import torch

# -----------------------------------------------------------------------------
# settings


def setting(default, doc):
    """A dataclass field whose documentation travels with it (the command line's --help reads it).
    """
    return field(default=default, metadata={"help": doc})


@dataclass
class ControlConfig:
    """The settings of E7 (see Controller). The paper's: alpha = 0.5, n = 30, no radius, no target.
    """
    step_size: float = setting(0.5, "alpha of E7, the size of each ascent step")
    n_steps: int = setting(30, "n of E7, the ascent steps per token")
    l2: float = setting(0.0, "lambda of E4/E7, the penalty on ||u||^2")
    radius: float | None = setting(None, "keep ||u|| <= radius * ||o_t|| (None or inf: no limit)")
    target: float | None = setting(None,
                                   "a row stops climbing once V(o_t + u) >= target (None: n steps)")

    def __post_init__(self):
        def number(x, least=-math.inf):
            return isinstance(x, (int, float)) and math.isfinite(x) and x >= least
        rules = [(number(self.step_size, 0),
                  f"step_size must be a number >= 0, got {self.step_size}"),
                 (number(self.n_steps, 0) and int(self.n_steps) == self.n_steps,
                  f"n_steps must be a whole number >= 0, got {self.n_steps}"),
                 (number(self.l2, 0), f"l2 must be a number >= 0, got {self.l2}"),
                 (self.radius is None or self.radius > 0,
                  f"radius must be > 0 (inf: no limit), got {self.radius}"),
                 (self.target is None or number(self.target),
                  f"target must be a finite number, 'none' or 'auto', got {self.target}")]
        problems = [message for ok, message in rules if not ok]
        if problems:
            raise ValueError("; ".join(problems))
        self.n_steps = int(self.n_steps)

    @classmethod
    def chosen(cls, stored, step_size=None, n_steps=None, radius=None, target="auto", l2=0.0):
        """The settings given here (the command line's), else those calibrated with V and `stored`
        in its checkpoint by train_value.py, else the paper's. target: a number, "none", or "auto"
        (the stored one)."""
        paper = cls()
        if target == "auto":
            target = stored.get("target")
        elif target == "none":
            target = None
        else:
            try:
                target = float(target)
            except (TypeError, ValueError):
                raise ValueError(f"target must be a number, 'none' or 'auto', got {target!r}") \
                    from None
        return cls(step_size=step_size if step_size is not None else stored.get("step_size",
                                                                                paper.step_size),
                   n_steps=n_steps if n_steps is not None else stored.get("n_steps",
                                                                          paper.n_steps), l2=l2,
                   radius=radius if radius is not None else stored.get("radius"), target=target)

    def with_total(self, total):
        """The same control with alpha * n = total (n kept, at least 1): the strength a sweep
        varies."""
        n = max(self.n_steps, 1)
        return replace(self, step_size=total / n, n_steps=n)

    def __str__(self):
        target = "none" if self.target is None else f"{self.target:+.3f}"
        return (f"alpha {self.step_size:g}, n {self.n_steps}, target V {target}, "
                f"radius {self.radius}")


# -----------------------------------------------------------------------------
# the controller


class Controller:
    """E7: u <- u + alpha * grad_u [V(o + u) - l2 * ||u||^2], at most n steps from u = 0; returns o
    + u.

    Works on the newest state only, (B, C); batched (each row gets its own u, since V is applied
    row-wise and the rows' objectives are summed); in fp32 whatever the model's dtype; the value
    network stays frozen.

    radius: keep the edit small relative to the state, ||u|| <= radius * ||o|| (a projection after
    each step). target: steer to a value, not by a fixed distance (as PRE-CONTROL does). A row stops
    its ascent at the first step where V(o + u) >= target, so a state that already looks good is
    left alone and a steep V cannot push far past the states the model visits. None: always n steps,
    the paper's E7.
    """

    def __init__(self, value, config=ControlConfig()):
        self.value, self.config = value, config
        # with a target: ascent steps summed over rows and calls, what the early stop saves
        self.steps_taken = 0

    def value_and_gradient(self, x):
        """V(x) (B,) and dV/dx (B, C): in closed form for value.ValueFunction (no autograd graph per
        step), by autograd for any other differentiable V."""
        if hasattr(self.value, "value_and_gradient"):
            return self.value.value_and_gradient(x)
        with torch.enable_grad():  # generation runs under no_grad; this needs gradients for x only
            x = x.detach().requires_grad_(True)
            v = self.value(x)
            # rows are independent: the sum's gradient is per row
            (gradient,) = torch.autograd.grad(v.sum(), x)
        return v.detach(), gradient

    def control(self, o):
        """u (B, C) for states o (B, C)."""
        c = self.config
        o = o.detach().float()
        u = torch.zeros_like(o)
        active = torch.ones(o.shape[0], dtype=torch.bool, device=o.device)  # rows still climbing
        limit = c.radius * o.norm(dim=-1, keepdim=True) if c.radius is not None else None  # (B, 1)
        for _ in range(c.n_steps):
            v, dv = self.value_and_gradient(o + u)  # V(o + u) (B,) and its gradient (B, C)
            if c.target is not None:
                active &= v < c.target  # reached the target: this row stops for good
                if not active.any():
                    break
            # >>> exercise E7: grad (B, C), the gradient in u of V(o + u) - l2 ||u||^2 (E4)
            grad = dv - 2 * c.l2 * u
            # <<< exercise E7
            if c.target is not None:  # rows that reached the target take no step
                grad = grad * active[:, None]
                self.steps_taken += active.sum()  # a tensor: no device sync in the loop
            # >>> exercise E7: one step of gradient ascent on u
            u = u + c.step_size * grad
            # <<< exercise E7
            if limit is not None:  # projection onto the ball ||u|| <= radius * ||o||
                u = u * (limit / u.norm(dim=-1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0)
        return u

    def __call__(self, o):
        if self.config.n_steps == 0 or self.config.step_size == 0:
            return o  # exactly the base model
        return (o.float() + self.control(o)).to(o.dtype)  # E3: the head reads o_t + u_t
