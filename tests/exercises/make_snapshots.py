"""The reference outputs the exercise tests compare with, computed once from the reference code through the adapters
and committed as snapshots.npz (a student copy grades against them without the solution).

    python tests/exercises/make_snapshots.py
"""

import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))]
import adapters  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from value import ValueConfig, ValueFunction  # noqa: E402


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=16)).eval()


def tiny_value():
    torch.manual_seed(1)
    return ValueFunction(ValueConfig(n_embd=16, width=8, activation="tanh")).requires_grad_(False)


def inputs():
    """Fixed inputs: tokens (2, 10), states o (3, 16), a right-padded batch of values, mask and rewards."""
    g = torch.Generator().manual_seed(2)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    return {"tokens": torch.randint(0, 50, (2, 10), generator=g), "o": torch.randn(3, 16, generator=g),
            "values": torch.randn(2, 5, generator=g), "mask": mask, "rewards": torch.tensor([1.0, -0.5]),
            "states": torch.randn(2, 5, 16, generator=g)}


def shift(o):  # the edit of the E3 test: a fixed vector added to the newest state
    return o + 0.5


def snapshots():
    model, value, x = tiny_model(), tiny_value(), inputs()
    out = {"e1_states": adapters.cached_states(model, x["tokens"], prefill=4), "e2_logits": adapters.head(model, x["o"])}
    for lam in (0.0, 0.5, 1.0):
        out[f"e6_returns_{lam}_real"] = adapters.returns(x["values"], x["mask"], x["rewards"], lam, gamma=0.9)[x["mask"]]
        out[f"e6_loss_{lam}"] = adapters.loss(value, x["states"], x["mask"], x["rewards"], lam)
    out["e7_u"] = adapters.control(value, x["o"], step_size=0.3, n_steps=5, l2=0.1)
    return {k: v.detach().float().numpy() if v.dtype != torch.long else v.numpy() for k, v in out.items()}


if __name__ == "__main__":
    np.savez(os.path.join(HERE, "snapshots.npz"), **snapshots())
    print(f"wrote {os.path.join(HERE, 'snapshots.npz')}")
