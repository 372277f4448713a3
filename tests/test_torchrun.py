"""torchrun: the loss of a batch split over processes, and (slow: several runs of the tools, each a new Python;
`pytest -m slow tests/`, which CI runs) two processes (gloo, on this CPU) that collect the same rollouts, train the
same V and write the same generations as one process does alone, and one process that resumes what two began."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one thread in every process, alone or beside another: the same kernels, so the same numbers to the last bit
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN = ["--model", os.path.join(FIXTURES, "base"), "--samples-per-prompt", "4", "--max-new-tokens", "24",
         "--epochs", "3", "--calibration-samples", "2", "--shard-size", "16", "--batch-size", "8",
         "--train-batch-size", "8"]


@pytest.mark.parametrize("method, batch", [("td", 7), ("official", 7), ("td", 2)])
def test_the_parts_of_a_batch_average_to_its_loss_and_gradient(method, batch, monkeypatch):
    from plumbing import parallel
    from train_value import counted_terms
    from value import ValueConfig, ValueFunction, bellman_loss
    torch.manual_seed(0)
    value = ValueFunction(ValueConfig(n_embd=8))
    states, rewards = torch.randn(batch, 6, 8), torch.randn(batch)
    mask = torch.arange(6)[None, :] < torch.randint(1, 7, (batch,))[:, None]  # responses of different lengths
    settings = (method, 0.5, 0.9, True)

    def loss_and_gradient(loss):
        return loss.item(), torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(value.parameters()))])

    whole = loss_and_gradient(bellman_loss(value, states, mask, rewards, *settings))
    n_parts = 3  # with 2 responses, the third process has none and joins with zeros
    parts = []
    for r in range(n_parts):  # what each of n_parts processes computes
        monkeypatch.setattr(parallel, "rank", lambda r=r: r)
        monkeypatch.setattr(parallel, "world_size", lambda: n_parts)
        parts.append(loss_and_gradient(parallel.split_loss(
            value, lambda v, s, m, r: bellman_loss(v, s, m, r, *settings), states, mask, rewards,
            counted_terms(method))))
    assert abs(sum(loss for loss, _ in parts) / n_parts - whole[0]) < 1e-6
    torch.testing.assert_close(sum(g for _, g in parts) / n_parts, whole[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("n_jobs, batch_size, world", [(10, 3, 3), (10, 3, 2), (4, 8, 3), (7, 1, 4)])
def test_batches_dealt_out_come_back_in_order(n_jobs, batch_size, world, monkeypatch):
    from plumbing import parallel
    dealt = {}
    for r in range(world):  # each process runs its own batches
        monkeypatch.setattr(parallel, "rank", lambda r=r: r)
        monkeypatch.setattr(parallel, "world_size", lambda: world)
        dealt[r] = [(start, end) for start, end in parallel.my_batches(n_jobs, batch_size)]
    ran = sorted(b for batches in dealt.values() for b in batches)
    assert ran == [(s, min(s + batch_size, n_jobs)) for s in range(0, n_jobs, batch_size)]  # each batch once

    def all_gather_object(everyone, mine):  # what torch.distributed would collect from the processes
        everyone[:] = [[list(range(start, end)) for start, end in dealt[r]] for r in range(world)]

    monkeypatch.setattr(parallel.dist, "all_gather_object", all_gather_object)
    gathered = parallel.map_batches(n_jobs, batch_size, lambda start, end: list(range(start, end)))
    assert [job for batch in gathered for job in batch] == list(range(n_jobs))


def run(script, args, processes):
    launcher = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    done = subprocess.run(launcher + [script] + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def shards(folder):
    names = sorted(f for f in os.listdir(folder) if f.startswith("shard_"))
    return names, [torch.load(os.path.join(folder, f), weights_only=True) for f in names]


def assert_same_shards(a, b):
    (names_a, shards_a), (names_b, shards_b) = shards(a), shards(b)
    assert names_a == names_b and len(names_a) > 2  # several shards: each process wrote some
    for x, y in zip(shards_a, shards_b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]) if torch.is_tensor(x[key]) else x[key] == y[key], key


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="two processes on two GPUs (nccl) need 2 CUDA devices"))])
def test_two_processes_equal_one(device, tmp_path):
    from worlds import toy
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(toy.World().train_prompts()[:20]) + "\n")
    train = TRAIN + ["--prompts", str(prompts), "--device", device]
    values = {}
    for n in (1, 2):
        out = tmp_path / f"{n}" / "value.pt"
        log = run("train_value.py", train + ["--out", str(out)], n)
        assert "radius" in log and "value checkpoint" in log  # rank 0's log, once
        values[n] = torch.load(out, weights_only=True)
    assert_same_shards(tmp_path / "1" / "value_rollouts", tmp_path / "2" / "value_rollouts")
    one, two = values[1], values[2]
    for key in one["state_dict"]:  # DDP sums the gradients in another order: equal within float rounding
        torch.testing.assert_close(one["state_dict"][key], two["state_dict"][key], atol=1e-5, rtol=0)
    assert one["metrics"]["epoch"] == two["metrics"]["epoch"] and one["control"]["radius"] == two["control"]["radius"]

    # generations with one V: the same JSON lines, byte for byte
    generate = ["--model", os.path.join(FIXTURES, "base"), "--value", str(tmp_path / "1" / "value.pt"),
                "--samples-per-prompt", "3", "--batch-size", "16", "--seeds", "0", "1", "--device", device]
    for n in (1, 2):
        log = run("generate.py", generate + ["--out", str(tmp_path / f"generations{n}.jsonl")], n)
        assert log.count("| RE-Control |") == 1
    assert (tmp_path / "generations1.jsonl").read_bytes() == (tmp_path / "generations2.jsonl").read_bytes()

    # one process resumes a collection that two began: the missing shard comes back the same
    folder = tmp_path / "2" / "value_rollouts"
    missing = sorted(folder.glob("shard_*.pt"))[1]
    os.remove(missing)
    log = run("train_value.py", train + ["--out", str(tmp_path / "2" / "value.pt")], 1)
    assert "are reused" in log
    assert_same_shards(tmp_path / "1" / "value_rollouts", folder)
