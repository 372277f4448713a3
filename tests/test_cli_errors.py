"""A user's bad day, through the scripts' real entry points (main() inside cli.run_cli, as `python script.py` runs
it): every bad input ends with the exit code that says what happened (2 a bad flag, 1 a run that could not produce
its output, 130 Ctrl-C), one line that names the problem, no traceback, and no file that was there changed."""

import gzip
import hashlib
import os
import shutil
import struct

import pytest
import torch

import compare
import generate
import train_value
from plumbing.checkpoints import save_pretrained
from plumbing.cli import run_cli
from conftest import FIXTURES, ROLLOUT_FLAGS
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


# -----------------------------------------------------------------------------
# a bad day at the system level: signals, leftovers, full disks, damaged files, two jobs on one output


def test_sigterm_is_handled_like_ctrl_c(inputs, capsys, monkeypatch):
    import signal

    def terminate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler, `timeout` or a container stop sends
    monkeypatch.setattr(train_value.worlds, "load_prompts", terminate)
    assert run(train_value, train()(inputs), capsys) == (143, "interrupted; rerun the same command to resume: "
                                                              "the rollout shards written so far are kept\n")


def test_a_rerun_removes_the_temporary_files_a_killed_writer_left(tmp_path, capsys):
    runs = tmp_path / "runs"
    (runs / "v_rollouts").mkdir(parents=True)
    dead = 2 ** 22 + 12345  # above Linux's default pid_max: no process has it
    (runs / f"v.pt.tmp{dead}").write_bytes(b"half a checkpoint")
    (runs / "v_rollouts" / f"shard_00000.pt.tmp{dead}").write_bytes(b"half a shard")
    argv = ["--model", os.path.join(FIXTURES, "base"), "--samples-per-prompt", "1", "--max-new-tokens", "8",
            "--epochs", "1", "--calibration-samples", "1", "--out", str(runs / "v.pt")]
    code, printed = run(train_value, argv, capsys)
    assert code == 0 and printed.count("temporary files left by a process that was killed") == 2
    assert not list(runs.rglob("*.tmp*")) and not list(runs.rglob("*.lock"))


def test_an_output_that_cannot_be_written_is_refused_before_any_work(inputs, capsys, monkeypatch):
    monkeypatch.setattr(train_value.worlds, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    code, printed = run(train_value, train("--out", "{d}/notes.txt/v.pt")(inputs), capsys)
    assert code == 2 and "notes.txt is a file, not a folder" in printed
    monkeypatch.setattr(generate.worlds, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    code, printed = run(generate, gen("--out", "{d}/notes.txt/gen.jsonl")(inputs), capsys)
    assert code == 2 and "notes.txt is a file, not a folder" in printed


def test_a_full_disk_is_one_line_that_names_the_file_and_the_old_file_stays(tmp_path):
    import subprocess
    import sys
    old = tmp_path / "v.pt"
    old.write_bytes(b"the previous checkpoint")
    script = ("import resource, signal, sys, torch\n"
              "sys.path.insert(0, sys.argv[2])\n"
              "from plumbing.cli import run_cli\n"
              "from plumbing.files import write_atomically\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # a disk with 4 KB left\n"
              "run_cli(lambda: write_atomically(sys.argv[1], lambda p: torch.save(torch.zeros(10000), p)))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script, str(old), root], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert f"could not write {old}" in done.stderr and "Traceback" not in done.stderr
    assert old.read_bytes() == b"the previous checkpoint" and not list(tmp_path.glob("*.tmp*"))


def test_a_flipped_bit_in_a_value_checkpoint_is_refused(inputs, tmp_path, capsys):
    import zipfile
    damaged = tmp_path / "value.pt"
    shutil.copy(os.path.join(FIXTURES, "value.pt"), damaged)
    with zipfile.ZipFile(damaged) as archive:  # a byte inside the first tensor's data
        info = next(i for i in archive.infolist() if "/data/" in i.filename)
    data = bytearray(damaged.read_bytes())
    name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)  # the local header's
    data[info.header_offset + 30 + name_length + extra_length + 5] ^= 0x40
    damaged.write_bytes(bytes(data))
    code, printed = run(generate, gen("--value", str(damaged))(inputs), capsys)
    assert code == 1 and f"value checkpoint {damaged} is damaged" in printed and "CRC-32" in printed


def test_a_truncated_rollout_shard_is_named_with_what_to_do(inputs, tiny_rollouts, tmp_path, capsys):
    folder = tmp_path / "rollouts"
    shutil.copytree(tiny_rollouts, folder)
    shard = sorted(folder.glob("shard_*.pt"))[0]
    shard.write_bytes(shard.read_bytes()[:len(shard.read_bytes()) // 2])
    code, printed = run(train_value, ["--model", os.path.join(FIXTURES, "base"), "--rollouts", str(folder),
                                      "--out", str(tmp_path / "v.pt"), *ROLLOUT_FLAGS, "--epochs", "1"], capsys)
    assert code == 1 and f"rollout shard {shard} is truncated or damaged" in printed
    assert "delete it and rerun the same command" in printed


def test_two_jobs_on_one_output_the_second_is_refused_and_a_dead_ones_lock_is_taken_over(inputs, tmp_path,
                                                                                         capsys):
    import subprocess
    import sys
    out = tmp_path / "v.pt"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "v.pt.lock").write_text(str(other.pid))  # another job, alive, holds --out
        code, printed = run(train_value, train("--out", str(out))(inputs), capsys)
        assert code == 1 and f"is in use by another job (process {other.pid})" in printed and not out.exists()
    finally:
        other.kill()
        other.wait()
    code, printed = run(train_value, train("--out", str(out))(inputs), capsys)  # its process is gone now
    assert code == 0 and f"the job that held it (process {other.pid}) is gone; taking it over" in printed
    assert out.exists() and not list(tmp_path.glob("*.lock"))


def test_a_stop_string_that_is_a_special_token_points_to_eos(inputs, capsys):
    code, printed = run(generate, gen("--stop", "<|endoftext|>")(inputs), capsys)
    assert code == 1 and "is a special token's text" in printed and "--eos '<|endoftext|>'" in printed


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(tmp_path, capsys):
    small = tmp_path / "small"
    save_pretrained(GPT(GPTConfig(vocab_size=100, block_size=48, n_layer=1, n_head=2, n_embd=16)), str(small))
    code, printed = run(generate, ["--model", str(small), "--tokenizer", os.path.join(FIXTURES, "base"),
                                   "--max-new-tokens", "4"], capsys)
    assert code == 1 and "tokens, but the model" in printed and "a vocabulary of 100" in printed


def test_the_history_beside_a_value_is_checked_like_the_value(inputs, tmp_path, capsys):
    out = tmp_path / "v.pt"
    (tmp_path / "v_history.json").write_text('{"made_by": {"reward": "another job"}, "history": []}')
    code, printed = run(train_value, train("--out", str(out))(inputs), capsys)
    assert code == 1 and "v_history.json was made with other settings" in printed and not out.exists()


@pytest.mark.slow
def test_two_different_jobs_started_together_on_one_folder_never_mix(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    common = ["train_value.py", "--model", os.path.join(FIXTURES, "base"), "--samples-per-prompt", "2",
              "--max-new-tokens", "16", "--epochs", "2", "--calibration-samples", "1", "--shard-size", "16",
              "--rollouts", str(tmp_path / "rollouts")]
    jobs = [subprocess.Popen([sys.executable, *common, "--seed", str(seed), "--out", str(tmp_path / f"v{seed}.pt")],
                             cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for seed in (0, 1)]
    results = [(job.wait(timeout=300), job.stderr.read()) for job in jobs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results  # one job did its work; the other was refused, whenever it came
    winner = [seed for seed, (code, _) in enumerate(results) if code == 0][0]
    refused = [err for code, err in results if code == 1][0]
    assert "is in use by another job" in refused or "made with other settings" in refused, refused
    import json
    settings = json.loads((tmp_path / "rollouts" / "rollouts.json").read_text())["settings"]
    assert settings["seed"] == winner and not (tmp_path / f"v{1 - winner}.pt").exists()
    assert not list(tmp_path.rglob("*.lock")) and not list(tmp_path.rglob("*.tmp*"))


def test_a_llama2c_model_whose_tokenizer_has_another_name_takes_tokenizer(tmp_path, capsys):
    from test_recipes import llama2c
    folder = tmp_path / "stories"
    llama2c(folder)
    (folder / "tokenizer.bin").rename(folder / "tok512.bin")  # as the TinyStories 260K model ships it
    argv = ["--model", str(folder / "model.bin"), "--prompts", "toy-test", "--reward", "sentiment",
            "--max-new-tokens", "4"]
    code, printed = run(generate, argv, capsys)
    assert code == 1 and "--tokenizer PATH" in printed and "tok512.bin" in printed
    assert run(generate, argv + ["--tokenizer", str(folder / "tok512.bin")], capsys)[0] == 0


def test_a_lock_this_process_holds_is_not_taken_over(tmp_path):
    from plumbing.files import Lock
    with Lock(str(tmp_path / "v.pt"), log=lambda *a: None):
        with pytest.raises(ValueError, match="already in use by this process"):
            Lock(str(tmp_path / "v.pt"), log=lambda *a: None).__enter__()
    assert not list(tmp_path.glob("*.lock"))
