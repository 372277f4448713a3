"""The verdict world (docs/verdict_world.md): its judge on hand-made responses, a reward model learned from the
judge's preferences, the FLOP counter against a hand count, and the settings matched to RE-Control's cost."""

import os
from types import SimpleNamespace

import pytest
import torch

import compare
from evaluation import cost
from model import GPTConfig
from value import ValueConfig
from worlds import verdict, verdict_rm

PROMPT = "ann reviews the drone : the battery is great ."


def test_the_judge_reads_the_last_sentence_only():
    responses = [" the price is bad . i love the design .",  # ends positively
                 " i love the design . the price is bad .",  # the same sentences, the other way round
                 " the price is not bad .",  # "not bad" is positive
                 " i would not recommend it .",
                 " the price is great . the the .",  # ungrammatical
                 ""]  # no sentence
    assert verdict.judge([PROMPT] * 6, responses).tolist() == [1.0, -1.0, 1.0, -1.0, -1.0, -1.0]


def test_the_judge_of_a_prefix_reads_its_complete_sentences():
    from worlds import toy
    enc = toy.encoding()
    tokens = enc.encode(" the price is bad . i love the design .")
    assert verdict.judge_of_prefix(PROMPT, tokens, enc, 0.25, verdict.judge) == 0.0  # no sentence yet
    assert verdict.judge_of_prefix(PROMPT, tokens, enc, 0.6, verdict.judge) == -1.0  # "the price is bad ."
    assert verdict.judge_of_prefix(PROMPT, tokens, enc, 1.0, verdict.judge) == 1.0


def test_prompts_give_both_openings_of_every_pair():
    train, test = verdict.prompts("train"), verdict.prompts("test")
    assert len(train) == 180 and len(test) == 60 and not set(train) & set(test)
    openings = [verdict.polarity(p.split(" :", 1)[1]) for p in train]
    assert openings == [1, -1] * 90


def test_a_reward_model_learns_the_judges_preferences(tiny_world):
    from plumbing.checkpoints import from_pretrained
    from plumbing.tokenizer import load_tokenizer
    base, enc = from_pretrained(tiny_world[0]), load_tokenizer(tiny_world[0])
    prompts = verdict.prompts("train")[:40]
    pairs = verdict_rm.judged_pairs(base, enc, prompts, 8, seed=0)
    train, held_out = pairs[:-100], pairs[-100:]
    rm = verdict_rm.new_reward_model(base, verdict_rm.RewardModelConfig())
    optimizer = torch.optim.Adam(rm.parameters(), lr=1e-3)
    for i in range(0, len(train), 32):
        loss = verdict_rm.bradley_terry_loss(rm, enc, train[i:i + 32])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert verdict_rm.pair_accuracy(rm.eval(), enc, held_out) >= 0.7  # chance is 0.5


def test_the_flop_counter_against_a_hand_count():
    config = GPTConfig(vocab_size=10, block_size=16, n_layer=2, n_head=2, n_embd=4)  # head_dim 2, MLP width 16
    per_layer = 4 * 12 + 4 * 4 + 4 * 16 + 16 * 4  # qkv, proj, MLP up and down: 192 weights
    assert cost.matrix_params(config) == 2 * per_layer
    assert cost.token_flops(config, 3) == 2 * 384 + 2 * 2 * (2 * 3 * 2 + 2 * 3 * 2)  # matrices + attention
    assert cost.head_flops(config) == 2 * 4 * 10
    assert cost.sequence_flops(config, 2) == cost.token_flops(config, 1) + cost.token_flops(config, 2) + 80
    # a prompt of 3 tokens and 2 decisions: the prefill with its head, then one more token and its head
    assert cost.sampling_flops(config, 3, 2) == cost.sequence_flops(config, 3) + cost.token_flops(config, 4) + 80
    assert cost.value_flops(ValueConfig(n_embd=4)) == 2 * (4 * 4 + 4 * 4 + 4)
    assert cost.ascent_flops(ValueConfig(n_embd=4), 10) == 10 * 2 * 72


def test_matched_settings_come_closest_to_re_controls_cost():
    def run(flops, n=10):
        return [([{}] * n, {"flops": flops * n})]
    args = SimpleNamespace(best_of=4, guide_k=10, guide_weight=2.0)
    runs = {"base": run(100.0), "RE-Control": run(250.0), "best-of-4": run(480.0),
            "ARGS (prefix R)": run(100.0 + 10 * 70.0)}
    best, args_k = compare.matched_methods(args, None, lambda p, r: torch.zeros(len(r)), runs)
    assert best.best_of == 2 and best.name == "best-of-2 (RE-Control's cost)"  # 250 / 120 = 2.08
    assert args_k.name == "ARGS k = 2 (RE-Control's cost)"  # (250 - 100) / 70 = 2.1
    runs["RE-Control"] = run(120.0)  # cheaper than two ARGS candidates: the cheapest ARGS runs
    best, args_k = compare.matched_methods(args, None, lambda p, r: torch.zeros(len(r)), runs)
    assert best.name == "best-of-1 (RE-Control's cost)" and args_k.name == "ARGS k = 2 (the cheapest)"


def test_the_world_flags_fail_clearly(capsys):
    from plumbing.cli import run_cli
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: compare.main(["--world", "nowhere"]))
    assert e.value.code == 2 and "--world must be one of toy, verdict" in capsys.readouterr().err
    if not os.path.exists(os.path.join(verdict.OUT, "rm-seed99")):
        from worlds import load_reward
        with pytest.raises(FileNotFoundError, match=r"python -m worlds.verdict_rm --seed 99"):
            load_reward("verdict-rm@99")
