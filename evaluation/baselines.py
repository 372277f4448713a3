"""
The paper's baselines (docs/method.md, E8), each a plug-in for the one sampling loop of
generate.sample, so that every method runs with the same prompts, the same reward and the same code
path:

- prompting: an instruction prepended to the prompt (no plug-in: the prompt changes);
- static representation editing (ITI-style): one fixed vector added to o_t at every step, the mean
  difference between the states of high- and low-reward rollouts (those the value function is
  trained on), scaled;
- best-of-N: N samples, the reward keeps the best (a selection after the loop);
- reward-guided decoding in the style of ARGS / controlled decoding: each step re-scores the top-k
  next tokens, adding weight x score to their logits, the score being the reward of the prefix with
  that token, or the learned V of the state that token leads to.
At strength 0 (scale 0, N = 1, weight 0) each is exactly the base model.
"""

import random

import torch

from plumbing.rewards import CountingReward


@torch.no_grad()
def steering_vector(rollouts, prompt_ids, quantile=0.5):
    """Mean state of rollouts above the reward quantile minus that of those below it, (C,).

    Each response contributes the mean of its states o_0 ... o_T, so long responses do not weigh
    more."""
    means, rewards = [], []
    for states, reward in rollouts.trajectories(set(prompt_ids), random.Random(0)):
        means.append(states.float().mean(0))
        rewards.append(float(reward))
    if not means:
        raise ValueError("no rollouts for these prompts to build a steering vector from")
    means, rewards = torch.stack(means), torch.tensor(rewards)
    threshold = rewards.quantile(quantile)
    high, low = rewards > threshold, rewards <= threshold
    # the quantile is the largest reward (few distinct values): split just below it
    if not high.any():
        high, low = rewards >= threshold, rewards < threshold
    if not high.any() or not low.any():
        raise ValueError(f"all {len(rewards)} rollouts have the same reward "
                         f"({rewards[0].item():g}); a steering vector needs higher and lower ones")
    return means[high].mean(0) - means[low].mean(0)


class SteeringEdit:
    """Static representation editing: o_t + scale * v at every step (E3 with a constant u)."""

    def __init__(self, vector, scale):
        self.vector, self.scale = vector, scale

    def __call__(self, o):
        if self.scale == 0:
            return o
        return (o.float() + self.scale * self.vector.to(o.device)).to(o.dtype)


def rescore_top_k(logits, k, weight, scores_of):
    """Keep the top-k tokens of each row, their logits raised by weight * score; the rest are ruled
    out. At weight 0 the logits are returned untouched: exactly the base model."""
    if weight == 0:
        return logits
    top = logits.topk(min(k, logits.shape[-1]), dim=-1)  # (B, k)
    scores = scores_of(top.indices)  # (B, k)
    rescored = torch.full_like(logits, float("-inf"))
    return rescored.scatter(1, top.indices, top.values + weight * scores.to(logits.dtype))


class PrefixRewardRescore:
    """ARGS-style: the reward of prompt + (response so far + candidate token) scores each candidate.
    """

    def __init__(self, reward_fn, tokenizer, prompts, k=10, weight=1.0):
        self.reward_fn = CountingReward(reward_fn)
        self.tokenizer, self.prompts, self.k, self.weight = tokenizer, prompts, k, weight

    @property
    def calls(self):
        """Responses the reward scored for this hook: its cost."""
        return self.reward_fn.calls

    def __call__(self, logits, tokens, cache):
        def scores_of(candidates):  # (B, k) token ids -> (B, k) rewards
            B, k = candidates.shape
            texts = [self.tokenizer.decode(tokens[i].tolist() + [c]) for i in range(B)
                     for c in candidates[i].tolist()]
            prompts = [p for p in self.prompts for _ in range(k)]
            return self.reward_fn(prompts, texts).view(B, k).to(logits.device)
        return rescore_top_k(logits, self.k, self.weight, scores_of)


class NextStateValueRescore:
    """Controlled decoding with the learned value: V(o_{t+1}) of the state each candidate token
    leads to.

    Every candidate costs a one-token forward pass. It is written into the cache slot that the
    chosen token will overwrite, and the cache is rewound after it, so the look-ahead leaves no
    trace."""

    def __init__(self, model, value, k=10, weight=1.0):
        self.model, self.value, self.k, self.weight = model, value, k, weight

    def __call__(self, logits, tokens, cache):
        def scores_of(candidates):
            scores = torch.empty(candidates.shape, device=logits.device)
            for j in range(candidates.shape[1]):
                o_next = self.model.states(candidates[:, j:j + 1], cache)[:, -1]  # (B, C)
                cache.rewind(1)  # its slot is written again by the token actually chosen
                scores[:, j] = self.value(o_next)
            return scores
        return rescore_top_k(logits, self.k, self.weight, scores_of)
