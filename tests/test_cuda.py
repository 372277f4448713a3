"""The GPU path: the model on CUDA gives the CPU's logits (fp32) and tokens (the random numbers are drawn on the CPU),
bf16 stays close, the control runs in fp32 on a bf16 model, and every tool runs with --device cuda --dtype bfloat16.
Skipped, with the reason printed, where torch sees no CUDA device."""

import os

import pytest
import torch

import compare
import generate
import train_value
from conftest import FIXTURES, random_model
from control import ControlConfig, Controller
from generate import SamplingConfig, sample
from value import ValueConfig, ValueFunction

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device here: the GPU path is checked where torch sees one")
PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "falcon"])
def test_logits_on_the_gpu_are_the_cpus(kind):
    cpu = random_model(kind)
    idx = torch.tensor([[1, 2, 3, 4, 5, 6]])
    expected = cpu(idx)
    gpu = random_model(kind).cuda()
    torch.testing.assert_close(gpu(idx.cuda()).cpu(), expected, atol=1e-4, rtol=1e-4)
    in_bf16 = gpu.to(torch.bfloat16)(idx.cuda()).float().cpu()
    assert (in_bf16 - expected).abs().max() < 0.05 * expected.abs().max()


def test_seeded_sampling_on_the_gpu_draws_the_cpus_tokens():
    config = SamplingConfig(max_new_tokens=12, eos_ids=[])
    on_cpu = sample(random_model("llama"), PROMPTS, config, seed=3)
    on_gpu = sample(random_model("llama").cuda(), PROMPTS, config, seed=3)
    assert on_gpu.tokens == on_cpu.tokens


def test_the_control_runs_in_fp32_on_a_bf16_model():
    model = random_model("llama").cuda().to(torch.bfloat16)
    value = ValueFunction(ValueConfig(n_embd=model.config.n_embd)).cuda().requires_grad_(False)
    seen = []

    def spy(o):
        seen.append((o.dtype, o.device.type))
        return value(o)

    controller = Controller(spy, ControlConfig(step_size=0.5, n_steps=3))
    out = sample(model, PROMPTS, SamplingConfig(max_new_tokens=4, eos_ids=[]), seed=0, edit=controller)
    assert len(out.tokens) == 3 and set(seen) == {(torch.float32, "cuda")}
    o = torch.randn(2, model.config.n_embd, device="cuda", dtype=torch.bfloat16)
    assert Controller(value, ControlConfig(0.5, 3))(o).dtype == torch.bfloat16  # the head reads o + u in the model's dtype


def test_every_tool_runs_on_the_gpu_in_bf16(tmp_path):
    gpu = ["--model", os.path.join(FIXTURES, "base"), "--device", "cuda", "--dtype", "bfloat16"]
    value = str(tmp_path / "value.pt")
    history = train_value.main(gpu + ["--out", value, "--samples-per-prompt", "2", "--max-new-tokens", "16",
                                      "--epochs", "2", "--calibration-samples", "1"])
    assert len(history) == 2 and os.path.exists(value)
    base, controlled = generate.main(gpu + ["--value", value, "--max-new-tokens", "16"])
    assert base["reward"] == base["reward"] and controlled["kl"] >= 0
    summaries = compare.main(gpu + ["--value", value, "--max-new-tokens", "16", "--samples-per-prompt", "1",
                                    "--seeds", "0", "--sweep-alphas", "1", "--out-dir", str(tmp_path / "compare")])
    assert len(summaries) == 7 and os.path.exists(tmp_path / "compare" / "table.md")
