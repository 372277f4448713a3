"""The baselines: exact base output at strength 0, what each one does at strength > 0, and their cost."""

import os

import pytest
import torch

import compare
from plumbing.rewards import CountingReward
from evaluation.baselines import (NextStateValueRescore, PrefixRewardRescore, SteeringEdit, rescore_top_k,
                       steering_vector)
from evaluation.harness import Method, sample_responses
from generate import SamplingConfig, sample
from model import GPT, GPTConfig
from value import ValueConfig, ValueFunction

PROMPTS = [[1, 2, 3], [4, 5], [6]]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=16)).eval()


class Letters:
    """A toy tokenizer: token i is the letter chr(97 + i % 26)."""
    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)

    def encode(self, text, allowed_special=()):
        return [ord(c) - 97 for c in text]

    def encode_single_token(self, name):
        raise KeyError(name)  # no special tokens, so no EOS


def count_a(prompts, responses):
    return torch.tensor([float(r.count("a")) for r in responses])


def test_every_baseline_at_strength_zero_is_exactly_the_base_model(model):
    base = sample(model, PROMPTS, SamplingConfig(max_new_tokens=10, eos_ids=[]), seed=3)
    value = ValueFunction(ValueConfig(n_embd=16)).requires_grad_(False)
    hooks = [dict(edit=SteeringEdit(torch.ones(16), 0.0)),
             dict(rescore=PrefixRewardRescore(count_a, Letters(), ["x"] * 3, k=5, weight=0.0)),
             dict(rescore=NextStateValueRescore(model, value, k=5, weight=0.0))]
    for hook in hooks:
        assert sample(model, PROMPTS, SamplingConfig(max_new_tokens=10, eos_ids=[]), seed=3, **hook).tokens == base.tokens


def test_best_of_one_and_no_instruction_are_the_base_model_and_best_of_n_keeps_the_best(model):
    config = SamplingConfig(max_new_tokens=8, samples_per_prompt=2, batch_size=4)
    enc = Letters()
    prompts = ["bcd", "ef"]
    base, _ = sample_responses(Method("base"), model, enc, prompts, count_a, config, seed=1)
    one, cost = sample_responses(Method("bo1", best_of=1), model, enc, prompts, count_a, config, seed=1)
    assert [r["tokens"] for r in one] == [r["tokens"] for r in base] and cost["reward_calls"] == 0
    unprompted, _ = sample_responses(Method("prompting", instruction=""), model, enc, prompts, count_a,
                                      config, seed=1)
    assert [r["tokens"] for r in unprompted] == [r["tokens"] for r in base]
    four, cost = sample_responses(Method("bo4", best_of=4), model, enc, prompts, count_a, config, seed=1)
    assert cost["reward_calls"] == 4 * len(four)
    # the kept sample of each job is the best of the 4 that were drawn for it (job j's copies: rows 4j ... 4j + 3)
    expanded = [p for p in prompts for _ in range(2) for _ in range(4)]
    drawn = sample(model, [enc.encode(p) for p in expanded], SamplingConfig(max_new_tokens=8, eos_ids=[]), seed=1, tokenizer=enc)
    for j, row in enumerate(four):
        assert row["reward"] == max(count_a(None, drawn.texts[4 * j:4 * j + 4]).tolist())


def test_prefix_reward_guide_steers_and_counts_its_calls(model):
    counting = CountingReward(count_a)
    guide = PrefixRewardRescore(counting, Letters(), ["x", "y", "z"], k=40, weight=100.0)
    out = sample(model, PROMPTS, SamplingConfig(max_new_tokens=6, eos_ids=[]), seed=0, rescore=guide)
    assert all(set(Letters().decode(t)) == {"a"} for t in out.tokens)  # token 0 or 26 each time
    assert counting.calls == 3 * 40 * 6  # rows x candidates x steps


def test_next_state_value_guide_leaves_the_cache_untouched(model):
    # weight tiny but not 0: every candidate is looked ahead through the cache, yet nothing changes
    value = ValueFunction(ValueConfig(n_embd=16)).requires_grad_(False)
    base = sample(model, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=0, eos_ids=[]))
    guided = sample(model, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=0, eos_ids=[]), rescore=NextStateValueRescore(model, value, k=40, weight=1e-30))
    assert guided.tokens == base.tokens


def test_next_state_value_guide_prefers_the_token_whose_next_state_is_valued(model):
    class PrefersToken7:  # V is high exactly for the state reached by feeding token 7
        def __call__(self, o):
            target = model.states(torch.tensor([[7]]))[0, -1]
            return -((o - target) ** 2).sum(-1)
    out = sample(model, [[7]], SamplingConfig(max_new_tokens=5, temperature=0, eos_ids=[]), rescore=NextStateValueRescore(model, PrefersToken7(), k=40, weight=1e4))
    assert out.tokens[0][0] == 7


def test_rescore_top_k_hand_case():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    out = rescore_top_k(logits, 2, 10.0, lambda c: torch.tensor([[0.0, 1.0]]))  # candidates [0, 2]
    assert out.tolist() == [[3.0, float("-inf"), 12.0, float("-inf")]]


def test_steering_vector_is_the_mean_state_difference():
    class FakeRollouts:
        def trajectories(self, prompt_ids, rng):
            yield torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor(1.0)  # mean (2, 0), high reward
            yield torch.tensor([[0.0, 2.0]]), torch.tensor(-1.0)  # mean (0, 2), low
            yield torch.tensor([[0.0, 4.0]]), torch.tensor(-1.0)  # mean (0, 4), low
    assert steering_vector(FakeRollouts(), [0]).tolist() == [2.0, -3.0]
    edit = SteeringEdit(torch.tensor([1.0, -1.0]), 0.5)
    assert edit(torch.zeros(3, 2)).tolist() == [[0.5, -0.5]] * 3


def test_compare_writes_table_csv_and_plots(tiny_world, tiny_rollouts, tmp_path):
    folder, value = tiny_world
    out = tmp_path / "cmp"
    summaries = compare.main(["--model", folder, "--value", value, "--rollouts", tiny_rollouts, "--out-dir", str(out),
                              "--seeds", "0", "1",
                              "--samples-per-prompt", "1", "--sweep-alphas", "0.1"])
    names = [s["method"] for s in summaries]
    assert names == ["base", "prompting", "static editing", "best-of-4", "ARGS (prefix R)", "CD (V next state)",
                     "RE-Control"]
    table = (out / "table.md").read_text()
    assert "| RE-Control |" in table and "SimCSE" in table
    assert (out / "table.csv").read_text().count("\n") == 8
    for png in ("reward_vs_fluency.png", "value_along_tokens.png", "value_training.png"):
        assert os.path.getsize(out / png) > 1000
    by_name = {s["method"]: s for s in summaries}
    assert by_name["best-of-4"]["reward_calls_per_response"] == 4.0
    assert by_name["ARGS (prefix R)"]["reward_calls_per_response"] > 10
    assert by_name["base"]["kl"] == 0.0 and by_name["RE-Control"]["kl"] > 0
