"""A user's bad day, through the scripts' real entry points (main() inside cli.run_cli, as `python script.py` runs
it): every bad input ends with the exit code that says what happened (2 a bad flag, 1 a run that could not produce
its output, 130 Ctrl-C), one line that names the problem, no traceback, and no file that was there changed."""

import gzip
import hashlib
import os

import pytest
import torch

import compare
import generate
import train_value
from plumbing.checkpoints import save_pretrained
from plumbing.cli import run_cli
from conftest import FIXTURES
from model import GPT, GPTConfig
from plumbing.tokenizer import save_tokenizer
from worlds import toy


def run(module, argv, capsys):
    """(exit code, everything printed) of `python module.py argv`."""
    try:
        run_cli(lambda: module.main(argv), getattr(module, "INTERRUPTED", "interrupted; nothing was written"))
        code, message = 0, ""
    except SystemExit as e:  # sys.exit("error: ...") exits with 1 and prints the message
        code, message = (1, e.code) if isinstance(e.code, str) else (e.code, "")
    out, err = capsys.readouterr()
    return code, out + err + message


def snapshot(*folders):
    """SHA-256 of every file under the folders."""
    digests = {}
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    digests[path] = hashlib.sha256(f.read()).hexdigest()
    return digests


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Bad input files, made once: each case reads them, none may change them."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "fake.jsonl.gz").write_text('{"prompt": "not compressed"}\n')
    (d / "a_folder").mkdir()
    (d / "prompt42.jsonl").write_text('{"prompt": 42}\n')
    (d / "blank.txt").write_text("\n   \n\n")
    (d / "latin1.txt").write_bytes("café reviews\n".encode("latin-1"))
    (d / "prompts.txt").write_text("ann reviews the phone :\n")
    (d / "notes.txt").write_text("my notes, not a checkpoint\n")
    with gzip.open(d / "good.jsonl.gz", "wt") as f:
        f.write('{"prompt": "bob reviews the drone :"}\n')
    torch.manual_seed(5)  # a model of the same width that V was not trained for
    save_pretrained(GPT(GPTConfig(vocab_size=400, block_size=48, n_layer=1, n_head=2, n_embd=64)), str(d / "other"))
    save_tokenizer(toy.encoding(), str(d / "other"))
    return d


def gen(*flags):
    return lambda d: ["--model", os.path.join(FIXTURES, "base"), "--max-new-tokens", "8",
                      *[f.format(d=d, value=os.path.join(FIXTURES, "value.pt")) for f in flags]]


def train(*flags):
    return lambda d: ["--model", os.path.join(FIXTURES, "base"), "--samples-per-prompt", "1", "--max-new-tokens", "8",
                      "--epochs", "1", "--calibration-samples", "1", "--out", str(d / "runs" / "v.pt"),
                      *[f.format(d=d, value=os.path.join(FIXTURES, "value.pt")) for f in flags]]


CASES = [  # (case, script, argv, exit code, what the message must say)
    ("temperature -1", generate, gen("--temperature", "-1"), 2, "--temperature must be a number >= 0 (0: greedy), got -1.0"),
    ("empty stop string", generate, gen("--stop", ""), 2, "--stop strings must not be empty"),
    ("top-p 1.5", generate, gen("--top-p", "1.5"), 2, "--top-p must be in (0, 1], got 1.5"),
    ("top-p 0", generate, gen("--top-p", "0"), 2, "--top-p must be in (0, 1], got 0.0"),
    ("top-k 0", generate, gen("--top-k", "0"), 2, "--top-k must be a whole number >= 1, got 0"),
    ("no samples", generate, gen("--samples-per-prompt", "0"), 2, "--samples-per-prompt must be a whole number >= 1"),
    ("NaN step size", generate, gen("--value", "{value}", "--step-size", "nan"), 2,
     "--step-size must be a number >= 0, got nan"),
    ("unknown dtype", generate, gen("--dtype", "int8"), 2, "unsupported dtype 'int8'"),
    ("cuda without a GPU", generate, gen("--device", "cuda"), 2, "--device cuda: torch sees 0 CUDA devices here"),
    ("--out is the prompt file", generate, gen("--prompts", "{d}/prompts.txt", "--out", "{d}/prompts.txt"), 2,
     "is also the prompt file; write the output to another file"),
    ("--out is someone else's file", generate, gen("--out", "{d}/notes.txt"), 2,
     "notes.txt exists and does not record what made it (not written by this tool, or by an older version); choose another path, or pass --overwrite"),
    (".gz that is not gzip", generate, gen("--prompts", "{d}/fake.jsonl.gz"), 1,
     "fake.jsonl.gz is not gzip-compressed, though its name ends in .gz"),
    ("folder as prompts", generate, gen("--prompts", "{d}/a_folder"), 1, "a_folder is a folder; pass a .txt"),
    ("prompt 42", generate, gen("--prompts", "{d}/prompt42.jsonl"), 1,
     "prompt42.jsonl, line 1: the prompt must be a non-empty string, got 42"),
    ("blank prompt file", generate, gen("--prompts", "{d}/blank.txt"), 1, "blank.txt holds no prompts"),
    ("not UTF-8", generate, gen("--prompts", "{d}/latin1.txt"), 1, "latin1.txt is not UTF-8 text"),
    ("unknown reward", generate, gen("--reward", "nice"), 1, "unknown reward 'nice'; use one of toy, "),
    ("reward of the wrong shape", generate, gen("--reward", "reward_plugins:wrong_shape_reward"), 1,
     "reward 'reward_plugins:wrong_shape_reward' returned shape (30, 2) for 30 responses"),
    ("reward NaN", generate, gen("--reward", "reward_plugins:nan_reward"), 1,
     "reward 'reward_plugins:nan_reward' returned nan for 30 of 30 responses"),
    ("reward raises", generate, gen("--reward", "reward_plugins:raising_reward"), 1,
     "reward 'reward_plugins:raising_reward' failed on 30 responses: RuntimeError: the reward server is down"),
    ("V of another model", generate, gen("--value", "{value}", "--model", "{d}/other"), 1, "whose weights differ"),
    ("V of another reward", generate, gen("--value", "{value}", "--reward", "sentiment"), 1,
     "predicts the reward 'toy', not 'sentiment'; pass --reward toy"),
    ("--eos that is not a token", generate, gen("--eos", "not one token"), 1,
     "--eos 'not one token' is not one token of this tokenizer"),
    ("unknown chat template", generate, gen("--chat", "alpaca"), 1, "unknown chat template 'alpaca'"),
    ("response longer than the context", generate, gen("--max-new-tokens", "60"), 1,
     "exceeds the model's context of 48"),
    ("best-of 0", compare, gen("--value", "{value}", "--best-of", "0"), 2, "--best-of must be a whole number >= 1, got 0"),
    ("NaN in the sweep", compare, gen("--value", "{value}", "--sweep-alphas", "1", "nan"), 2, "--sweep-alphas must be numbers >= 0"),
    ("unknown activation", train_value, train("--activation", "swish"), 2, "--activation 'swish' is unknown"),
    ("no epochs", train_value, train("--epochs", "0"), 2, "--epochs must be a whole number >= 1, got 0"),
    ("gamma NaN", train_value, train("--gamma", "nan"), 2, "--gamma must be in (0, 1], got nan"),
    ("lambda 2", train_value, train("--lam", "2"), 2, "--lam must be in [0, 1], got 2.0"),
    ("no rollouts per prompt", train_value, train("--samples-per-prompt", "0"), 2,
     "--samples-per-prompt must be a whole number >= 1, got 0"),
    ("--out is someone else's file", train_value, train("--out", "{d}/notes.txt"), 2,
     "notes.txt exists and does not record what made it"),
    ("--out is another job's V", train_value, train("--out", "{value}"), 1,
     "value.pt was made with other settings ("),
    ("--rollouts is a file", train_value, train("--rollouts", "{d}/notes.txt"), 2, "notes.txt is a file; name a folder"),
    ("rewards all NaN", train_value, train("--reward", "reward_plugins:nan_reward"), 1, "returned nan for 90 of 90"),
]


@pytest.mark.parametrize("case, script, argv, code, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, script, argv, code, message, inputs, capsys):
    before = snapshot(inputs, FIXTURES)
    got, printed = run(script, argv(inputs), capsys)
    assert (got, message in printed) == (code, True), printed[-600:]
    assert "Traceback" not in printed
    assert snapshot(inputs, FIXTURES) == before  # nothing that was there changed
    assert not os.path.exists(inputs / "runs" / "v.pt")  # and no value checkpoint was written


def test_ctrl_c_is_one_line_and_exit_code_130(inputs, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_value.worlds, "load_prompts", interrupt)
    assert run(train_value, train()(inputs), capsys) == (130, "interrupted; rerun the same command to resume: the "
                                                              "rollout shards written so far are kept\n")
    monkeypatch.setattr(generate.worlds, "load_prompts", interrupt)
    assert run(generate, gen()(inputs), capsys) == (130, "interrupted; nothing was written\n")


def test_rollouts_and_checkpoints_are_reused_only_by_the_same_job(inputs, tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = ["--model", os.path.join(FIXTURES, "base"), "--samples-per-prompt", "1", "--max-new-tokens", "8",
            "--epochs", "1", "--calibration-samples", "1", "--rollouts", str(runs / "rollouts")]
    code, printed = run(train_value, argv + ["--out", str(runs / "v.pt")], capsys)
    assert code == 0 and "rollouts: collecting 1 responses for each of 90 prompts" in printed
    # the same job again: its own checkpoint may be replaced, its rollouts are reused (and said to be)
    code, printed = run(train_value, argv + ["--out", str(runs / "v.pt")], capsys)
    assert code == 0 and "rollouts: 1 shards already in" in printed and "are reused" in printed
    # another reward on the same rollouts: refused, with what differs and the two ways out
    before = snapshot(runs)
    code, printed = run(train_value, argv + ["--out", str(runs / "v2.pt"), "--reward", "sentiment"], capsys)
    assert code == 1 and "holds rollouts made with other settings (reward: toy -> sentiment)" in printed
    assert "pass --overwrite to collect them again there, or name another folder with --rollouts" in printed
    assert snapshot(runs) == before
    # the same checkpoint path for another job: refused; with --overwrite, both are made again
    code, printed = run(train_value, argv + ["--out", str(runs / "v.pt"), "--reward", "sentiment"], capsys)
    assert code == 1 and "v.pt was made with other settings" in printed and snapshot(runs) == before
    code, printed = run(train_value, argv + ["--out", str(runs / "v.pt"), "--reward", "sentiment", "--overwrite"],
                        capsys)
    assert code == 0 and "rollouts: collecting" in printed
    assert torch.load(runs / "v.pt", weights_only=True)["reward"] == "sentiment"


def test_generations_record_what_made_them_and_are_replaced_only_by_the_same_run(inputs, tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    argv = gen("--prompts", "{d}/good.jsonl.gz", "--value", "{value}", "--out", str(out))(inputs)
    assert run(generate, argv, capsys)[0] == 0
    first = out.read_text()
    assert run(generate, argv, capsys)[0] == 0 and out.read_text() == first  # the same run: same file
    code, printed = run(generate, argv + ["--temperature", "0.5"], capsys)
    assert code == 1 and "gen.jsonl was made with other settings (sampling.temperature: 1.0 -> 0.5)" in printed
    assert out.read_text() == first
    assert run(generate, argv + ["--temperature", "0.5", "--overwrite"], capsys)[0] == 0 and out.read_text() != first


def test_help_shows_the_defaults(capsys):
    code, printed = run(generate, ["--help"], capsys)
    assert code == 0 and "tau of E2 (0: greedy) (default: 1.0)" in " ".join(printed.split())
    code, printed = run(train_value, ["--help"], capsys)
    printed = " ".join(printed.split())
    assert code == 0 and "(default: 100)" in printed and "(default: out/toyworld/value.pt)" in printed


def test_generate_runs_with_no_sampling_flags_on_a_toy_model(capsys):
    # the response length comes from the model's context (here 48 - 5 prompt tokens), not a fixed 128
    code, printed = run(generate, ["--model", os.path.join(FIXTURES, "base")], capsys)
    assert code == 0 and "| base |" in printed


def test_nothing_in_the_project_points_outside_it():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outside = ".." + "/shared"  # the team's notes, which a clone does not have
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [s for s in subfolders if s not in (".git", "out", "__pycache__", ".pytest_cache")]
        for name in files:
            if name.endswith((".py", ".md")):
                assert outside not in open(os.path.join(folder, name)).read(), os.path.join(folder, name)


def test_the_steering_vector_with_few_distinct_rewards():
    from evaluation.baselines import steering_vector

    class Rollouts:  # rewards 0, 1, 1, 1: the median is the largest value
        def trajectories(self, prompt_ids, rng):
            for i, r in enumerate([0.0, 1.0, 1.0, 1.0]):
                yield torch.tensor([[float(i), 0.0]]), torch.tensor(r)
    assert steering_vector(Rollouts(), [0]).tolist() == [2.0, 0.0]
