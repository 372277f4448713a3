"""
The controller of RE-Control (docs/method.md, E7) and the choice of its strength.

- Controller: at every decoding step, gradient ascent on the value V_phi(o_t + u) moves the newest state o_t by u
  before the LM head reads it (E3). It plugs into model.generate as `edit`, so plain and controlled sampling share
  one loop, and u never enters the KV cache.
- calibrate_control: how far the control may move the state, chosen on validation prompts.
"""

import math

import torch

from model import generate

# -----------------------------------------------------------------------------
# the controller


class Controller:
    """E7: u <- u + alpha * grad_u [V(o + u) - l2 * ||u||^2], at most n steps from u = 0; returns o + u.

    Works on the newest state only, (B, C); batched (each row gets its own u, since V is applied row-wise and
    the rows' objectives are summed); in fp32 whatever the model's dtype; the value network stays frozen.

    radius: keep the edit small relative to the state, ||u|| <= radius * ||o|| (a projection after each step).
    target: steer to a value, not by a fixed distance (as PRE-CONTROL does). A row stops its ascent at the first
    step where V(o + u) >= target, so a state that already looks good is left alone and a steep V cannot push
    far past the states the model visits. None: always n steps, the paper's E7.
    """

    def __init__(self, value, step_size=0.5, n_steps=30, l2=0.0, radius=None, target=None):
        if not (step_size >= 0 and n_steps >= 0 and l2 >= 0):  # also refuses NaN
            raise ValueError(f"the control needs step size >= 0, steps >= 0 and l2 >= 0; got step size "
                             f"{step_size}, {n_steps} steps, l2 {l2}")
        if int(n_steps) != n_steps:
            raise ValueError(f"the number of control steps must be a whole number, got {n_steps}")
        if radius is not None and not radius > 0:
            raise ValueError(f"the radius must be > 0 (or None for no limit), got {radius}")
        if target is not None and not math.isfinite(target):
            raise ValueError(f"the target value must be a finite number (or None), got {target}")
        self.value, self.step_size, self.n_steps, self.l2 = value, step_size, int(n_steps), l2
        self.radius, self.target = radius, target
        self.steps_taken = 0  # with a target: ascent steps summed over rows and calls, what the early stop saves

    def control(self, o):
        """u (B, C) for states o (B, C)."""
        o = o.detach().float()
        u = torch.zeros_like(o)
        active = torch.ones(o.shape[0], dtype=torch.bool, device=o.device)  # rows still climbing
        limit = self.radius * o.norm(dim=-1, keepdim=True) if self.radius is not None else None  # (B, 1)
        with torch.enable_grad():  # generation runs under no_grad; the inner loop needs gradients for u only
            for _ in range(self.n_steps):
                u.requires_grad_(True)
                v = self.value(o + u)  # (B,)
                if self.target is not None:
                    active &= v.detach() < self.target  # reached the target: this row stops for good
                    if not active.any():
                        break
                objective = v.sum() - self.l2 * (u ** 2).sum()  # E4's trade-off, per row
                (grad,) = torch.autograd.grad(objective, u)
                if self.target is not None:  # rows that reached the target take no step
                    grad = grad * active[:, None]
                    self.steps_taken += active.sum()  # a tensor: no device sync in the loop
                u = (u + self.step_size * grad).detach()  # E7: one step of gradient ascent
                if limit is not None:  # projection onto the ball ||u|| <= radius * ||o||
                    u = u * (limit / u.norm(dim=-1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0)
        return u

    def __call__(self, o):
        if self.n_steps == 0 or self.step_size == 0:
            return o  # exactly the base model
        return (o.float() + self.control(o)).to(o.dtype)  # E3: the head reads o_t + u_t


# -----------------------------------------------------------------------------
# choosing the strength of the control on validation prompts

RADII = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0)  # radius * ||o|| tried by calibrate_control


def calibrate_control(model, enc, prompts, value, reward_fn, step_size=3.2, n_steps=20, target=None, kl_budget=0.1,
                      is_grammatical=None, min_grammar_ratio=0.95, samples_per_prompt=16, batch_size=64,
                      max_new_tokens=32, temperature=1.0, top_k=None, top_p=None, stop_strings=(), seed=0,
                      radii=RADII, log=print):
    """Choose how far E7 may move the state, on validation prompts: the largest radius (||u|| <= radius * ||o||),
    tried smallest first, whose mean per-token KL from the base model stays within `kl_budget` (and, with a
    grammar check, whose grammatical fraction stays >= min_grammar_ratio x the base model's).
    Returns (radius or None when even the smallest breaks the budget, the curve it came from).

    The radius, not alpha, is the knob: alpha * grad V moves the state by an amount that depends on how steep this
    particular V is (and so on the machine and the seed that trained it), while the radius is a distance in the
    state's own units. The prompts must be validation prompts (never the test prompts): this is a choice of a
    hyper-parameter. The sweep stops at the first radius over budget, so a noisy pass further on is never taken.
    """
    jobs = [enc.encode(p, allowed_special="all") for p in prompts for _ in range(samples_per_prompt)]
    job_prompts = [p for p in prompts for _ in range(samples_per_prompt)]

    def sample(edit):
        texts, kls = [], []
        for b in range(0, len(jobs), batch_size):
            out = generate(model, jobs[b:b + batch_size], max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, stop_strings=stop_strings, tokenizer=enc, seed=seed * 1_000_003 + b,
                           edit=edit, record_kl=True)
            texts += out.texts
            kls += out.kl
        point = {"kl": sum(kls) / len(kls), "reward": reward_fn(job_prompts, texts).float().mean().item()}
        if is_grammatical is not None:
            point["grammatical"] = sum(map(is_grammatical, texts)) / len(texts)
        return point

    base = sample(None)
    curve, chosen = [{"radius": 0, **base, "ok": True}], None
    for radius in radii:
        point = sample(Controller(value, step_size, n_steps, radius=radius, target=target))
        point["ok"] = point["kl"] <= kl_budget and (is_grammatical is None or
                                                    point["grammatical"] >= min_grammar_ratio * base["grammatical"])
        curve.append({"radius": radius, **point})
        grammar = f", grammatical {point['grammatical']:.1%}" if is_grammatical else ""
        log(f"calibration: radius {radius:<4g} | reward {point['reward']:+.3f} (base {base['reward']:+.3f}) | "
            f"KL/token {point['kl']:.3f}{grammar} | {'within budget' if point['ok'] else 'over budget: stop'}")
        if not point["ok"]:
            break
        chosen = radius
    return chosen, curve
