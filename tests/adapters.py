"""The one place the exercise tests (tests/exercises/) touch the code they grade. Grading puts back this file as it
was handed out, with the rest of tests/: keep the names and arguments the exercises' docstrings give."""

import torch

from control import ControlConfig, Controller
from generate import SamplingConfig, controlled_logits, sample
from evaluation.metrics import diversity as diversity_of
from value import bellman_loss, lambda_returns


def cached_states(model, tokens, prefill):
    """E1: the states o (B, T, C) of tokens (B, T) read through a KV cache: `prefill` tokens at once, then one by one."""
    with torch.no_grad():
        cache = model.new_cache(tokens.shape[0], tokens.shape[1])
        steps = [model.states(tokens[:, :prefill], cache)]
        steps += [model.states(tokens[:, t:t + 1], cache) for t in range(prefill, tokens.shape[1])]
        return torch.cat(steps, dim=1)


def head(model, o):
    """E2: the logits (..., vocab) the head reads from states o (..., C)."""
    with torch.no_grad():
        return model.head(o)


def greedy(model, prompts, n, edit=None):
    """E3: n greedy tokens for each prompt (lists of ids), with an edit of the newest state; (tokens, states)."""
    out = sample(model, prompts, SamplingConfig(max_new_tokens=n, temperature=0, eos_ids=[]), edit=edit,
                 record_states=True)
    return out.tokens, out.states


def logits(model, o, edit, want_base):
    """E3: (the logits to sample from, the base model's logits W o or None) for states o (B, C)."""
    with torch.no_grad():
        return controlled_logits(model, o, edit, want_base)


def kl(model, prompts, n, edit=None):
    """E3: the mean KL per decision from the base model of n greedy tokens, one float per prompt."""
    return sample(model, prompts, SamplingConfig(max_new_tokens=n, temperature=0, eos_ids=[]), edit=edit,
                  record_kl=True).kl


def returns(values, mask, rewards, lam, gamma=1.0, stop_gradient=True):
    """E6: the lambda-returns G_t (B, L) of values V(o_t) (B, L) of right-padded responses."""
    return lambda_returns(values, mask, rewards, lam, gamma, stop_gradient)


def loss(value, states, mask, rewards, lam, gamma=1.0):
    """E6: the TD(lambda) loss of V on states (B, L, C), a scalar tensor."""
    return bellman_loss(value, states, mask, rewards, "td", lam, gamma)


def control(value, o, step_size, n_steps, l2=0.0):
    """E7: the edit u (B, C) that n_steps of gradient ascent on V from u = 0 give for states o (B, C)."""
    return Controller(value, ControlConfig(step_size, n_steps, l2)).control(o)


def diversity(responses):
    """E8: the mean diversity of responses (lists of token ids)."""
    return diversity_of(responses)
