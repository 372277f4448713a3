"""Reward plug-ins (--reward reward_plugins:NAME) that break their contract, for test_cli_errors.py."""

import torch


def nan_reward(prompts, responses):
    return torch.full((len(responses),), float("nan"))


def wrong_shape_reward(prompts, responses):
    return torch.zeros(len(responses), 2)


def raising_reward(prompts, responses):
    raise RuntimeError("the reward server is down")


def few_values_reward(prompts, responses):
    """Mostly 1.0: its median is its largest value."""
    return torch.tensor([0.0 if i % 4 == 0 else 1.0 for i in range(len(responses))])
