"""The whole method on a tiny toy world (pretrain -> rollouts -> V -> control), rollout storage and resumption,
prompt files, rewards, the toy world's grammar and reward. (Bad inputs: test_cli_errors.py.)"""

import json
import os
import shutil

import pytest
import torch

import compare
import generate
import worlds
from conftest import ROLLOUT_FLAGS
from generate import SamplingConfig
from plumbing.checkpoints import from_pretrained
from plumbing.prompts import hh_prompt
from rollouts import Rollouts, collect_rollouts
from worlds import load_prompts, load_reward, toy


def assert_the_default_value_steers(folder, value, tmp_path):
    # no control flags: the radius that train_value.py calibrated on its held-out prompts
    out = tmp_path / "gen.jsonl"
    base, ctrl = generate.main(["--model", folder, "--prompts", "toy-test", "--reward", "toy", "--value", value,
                                "--samples-per-prompt", "4", "--max-new-tokens", "32", "--seeds", "0", "1",
                                "--out", str(out)])
    assert ctrl["reward"] > base["reward"] + 0.1, (base, ctrl)
    assert ctrl["grammatical"] >= 0.9 * base["grammatical"], (base, ctrl)
    header, *rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert header["made_by"]["values"] == [value] and header["made_by"]["seeds"] == [0, 1]
    assert len(rows) == 2 * 2 * 30 * 4 and {"reward", "value_start", "value_end", "response"} <= set(rows[0])
    checkpoint = torch.load(value, weights_only=True)
    assert checkpoint["reward"] == "toy" and checkpoint["train_args"]["training"]["lam"] == 1.0
    assert -1 <= checkpoint["metrics"]["corr"] <= 1 and checkpoint["metrics"]["error"] < checkpoint["metrics"]["best_constant"]
    control = checkpoint["control"]  # calibrated on held-out training prompts, the curve kept
    assert control["radius"] > 0 and control["n_steps"] == 20 and control["curve"][0]["radius"] == 0
    assert all(point["ok"] for point in control["curve"][:-1])  # every radius up to the chosen one was in budget


def test_the_committed_tiny_value_steers(tiny_world, tmp_path):
    assert_the_default_value_steers(*tiny_world, tmp_path)


@pytest.mark.slow
def test_the_whole_method_from_scratch_steers(tmp_path):
    # what tests/make_fixtures.py does: pretrain a base model, collect rollouts, train V, calibrate its control
    import make_fixtures
    folder, value = make_fixtures.make(str(tmp_path / "world"), log=lambda *a: None)
    assert_the_default_value_steers(folder, value, tmp_path)


def test_the_step_size_is_calibrated_on_held_out_training_prompts_only(tiny_world, tiny_rollouts, tmp_path,
                                                                           monkeypatch):
    import train_value
    folder, value = tiny_world
    seen = []

    def spy(model, enc, prompts, *args, **kwargs):
        seen.extend(prompts)
        return 0.5, [{"radius": 0}]

    def never(*args):
        raise AssertionError("the test prompts were read")

    monkeypatch.setattr(train_value, "calibrate_control", spy)
    monkeypatch.setattr(toy.World, "test_prompts", never)
    train_value.main(["--model", folder, "--out", str(tmp_path / "v.pt"), "--rollouts", tiny_rollouts,
                      *ROLLOUT_FLAGS, "--epochs", "1"])  # the fixture's rollouts, reused: same settings
    train = toy.World().train_prompts()
    assert seen and set(seen) < set(train) and len(set(seen)) == round(0.1 * len(train))
    assert torch.load(tmp_path / "v.pt", weights_only=True)["control"]["radius"] == 0.5


def test_rollouts_resume_and_refuse_other_settings(tiny_world, tmp_path):
    folder, _ = tiny_world
    model = from_pretrained(folder)
    enc = toy.encoding()
    prompts = toy.World().train_prompts()[:6]
    kwargs = dict(config=SamplingConfig(max_new_tokens=16, samples_per_prompt=3, batch_size=5), shard_size=7, seed=1,
                  log=lambda *a: None)
    collect_rollouts(model, enc, prompts, toy.reward, str(tmp_path / "r"), **kwargs)
    shards = sorted((tmp_path / "r").glob("shard_*.pt"))
    assert len(shards) == 3  # 18 responses in shards of 7
    first = torch.load(shards[1], weights_only=True)
    os.remove(shards[1])
    with pytest.raises(FileNotFoundError, match="rollout shards are missing"):
        Rollouts(str(tmp_path / "r"))
    collect_rollouts(model, enc, prompts, toy.reward, str(tmp_path / "r"), **kwargs)  # resumes
    again = torch.load(shards[1], weights_only=True)
    assert again["texts"] == first["texts"] and torch.equal(again["states"], first["states"])
    assert again["states"].dtype == torch.float16
    batches = list(Rollouts(str(tmp_path / "r")).batches(range(6), batch_size=4))
    assert sum(len(r) for _, _, r in batches) == 18
    states, mask, rewards = batches[0]
    assert states.shape[:2] == mask.shape and mask[:, 0].all()
    with pytest.raises(ValueError, match=r"holds rollouts made with other settings \(seed: 1 -> 2\); pass --overwrite"):
        collect_rollouts(model, enc, prompts, toy.reward, str(tmp_path / "r"), **dict(kwargs, seed=2))


def test_toy_grammar_and_reward():
    assert toy.is_grammatical(" the price is not very good . i would recommend it .")
    assert toy.is_grammatical(" i do not hate the battery .")
    assert not toy.is_grammatical(" the price is good good .")
    assert not toy.is_grammatical(" the price is good")
    assert not toy.is_grammatical(" reviews the screen is great .")
    assert not toy.is_grammatical(" a . b . c . d .")
    r = toy.reward(None, [" the price is not bad .", " i hate the sound . the build is great .", " ."])
    assert r.tolist() == [1.0, 0.0, 0.0]
    world = toy.World()
    assert not set(world.train_prompts()) & set(world.test_prompts()) and len(world.test_prompts()) == 30
    rng = __import__("random").Random(0)
    samples = [world.sample_response("ann", "drone", rng) for _ in range(200)]
    assert all(toy.is_grammatical(s) for s in samples)
    enc = toy.encoding()
    assert len(enc.encode(" the price is great .")) == 5 and enc.decode(enc.encode(samples[0])) == samples[0]


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["first prompt", "second prompt"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert load_prompts(str(tmp_path / "p.jsonl")) == ["a", "b"]
    import gzip
    dialogue = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine, thanks"
    with gzip.open(tmp_path / "hh.jsonl.gz", "wt") as f:
        f.write(json.dumps({"chosen": dialogue, "rejected": dialogue + "!"}) + "\n")
    assert load_prompts(str(tmp_path / "hh.jsonl.gz")) == ["\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?"
                                                            "\n\nAssistant:"]
    assert hh_prompt(dialogue).endswith("how are you?\n\nAssistant:")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 1: expected a JSON object with a \"prompt\" field"):
        load_prompts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.txt"))


def test_rewards(tmp_path):
    sentiment = load_reward("sentiment")
    assert sentiment(["", ""], ["What a wonderful, lovely day.", "This is not good at all."]).tolist() == [1.0, -1.0]
    assert load_reward("worlds.toy:reward").function is toy.reward
    with pytest.raises(ValueError, match="cannot import nothing from worlds.toy"):
        load_reward("worlds.toy:nothing")


def test_reward_model_through_model_py(tmp_path):
    from conftest import tiny_gpt2, train_gpt2_files
    train_gpt2_files(tmp_path)
    ref = tiny_gpt2(tmp_path, cls_head=True, vocab_size=400)
    rm = load_reward(f"rm:{tmp_path}")
    prompts, responses = ["Hello ", "Hi "], ["world!", "there, how are you?"]
    scores = rm(prompts, responses)
    with torch.no_grad():
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([rm.function.tokenizer.encode(p + r)])
            assert abs(scores[i] - ref(ids).logits[0, 0]) <= 1e-4
    tiny_gpt2(tmp_path / "lm", vocab_size=400)
    train_gpt2_files(tmp_path / "lm")
    with pytest.raises(ValueError, match="is a language model, not a reward model"):
        load_reward(f"rm:{tmp_path / 'lm'}")


def test_reward_quantile_of_the_training_rollouts(tiny_rollouts):
    rollouts = Rollouts(tiny_rollouts)
    ids = set(range(0, 90, 2))
    rewards = torch.cat([r for _, _, r in rollouts.batches(ids, 64)])
    assert rollouts.reward_quantile(ids, 0.9) == torch.quantile(rewards, 0.9).item()
    assert rollouts.reward_quantile(ids, 0.0) == rewards.min().item()


def test_several_values_share_one_run_of_the_base_model(tiny_world, tmp_path):
    folder, value = tiny_world
    twin = tmp_path / "twin.pt"
    shutil.copy(value, twin)
    summaries = generate.main(["--model", folder, "--max-new-tokens", "8", "--value", value, str(twin)])
    assert [s["method"] for s in summaries] == ["base", f"RE-Control ({value})", f"RE-Control ({twin})"]
    assert summaries[1]["reward"] == summaries[2]["reward"]  # the same V on the same seeds


def test_dtype_applies_to_the_toy_world_too(tiny_world, monkeypatch):
    from plumbing.tokenizer import load_tokenizer
    folder, _ = tiny_world
    monkeypatch.setattr(toy, "load_variant", lambda spec, log: (from_pretrained(folder), load_tokenizer(folder)))
    model, _ = worlds.load_model("toy", dtype="bfloat16")
    assert model.wte.weight.dtype == torch.bfloat16


def test_chat_templates_and_reward_model_layouts(tmp_path):
    from conftest import tiny_gpt2, train_gpt2_files
    vicuna = load_prompts("toy-test", chat="vicuna")[0]
    assert vicuna.startswith("A chat between a curious user") and vicuna.endswith("USER: " + load_prompts("toy-test")[0]
                                                                                   + " ASSISTANT:")
    llama3 = load_prompts("toy-test", chat="llama3")[0]
    assert llama3.startswith("<|begin_of_text|><|start_header_id|>user") and llama3.endswith("<|end_header_id|>\n\n")
    with pytest.raises(ValueError, match="unknown chat template 'alpaca'"):
        load_prompts("toy-test", chat="alpaca")
    train_gpt2_files(tmp_path)
    tiny_gpt2(tmp_path, cls_head=True, vocab_size=400)
    plain, ultra = load_reward(f"rm:{tmp_path}"), load_reward(f"rm:{tmp_path}::ultrarm")
    assert ultra(["Hi"], [" there"]) == plain(["Human: Hi\nAssistant:"], ["  there"])
    with pytest.raises(ValueError, match="unknown format 'nope' after '::'"):
        load_reward(f"rm:{tmp_path}::nope")


def test_eos_names_the_tokens_that_end_a_response(tiny_world, tmp_path):
    folder, _ = tiny_world
    out = tmp_path / "gen.jsonl"
    generate.main(["--model", folder, "--eos", " .", "--max-new-tokens", "16", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()[1:]]
    assert all(" ." not in r["response"] for r in rows) and sum(r["finished"] for r in rows) >= 0.9 * len(rows)
    assert all(len(r["tokens"]) < 16 or not r["finished"] for r in rows)
