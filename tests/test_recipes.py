"""The README's real-model recipe, `train_value.py` then `generate.py`, end to end on a tiny checkpoint in each format
the project reads (written here in that format), with a reward model where one applies."""

import os

import pytest
import torch

import generate
import train_value
from conftest import tiny_falcon, tiny_gpt2, tiny_llama, train_gpt2_files
from test_checkpoints import write_meta_folder
from test_llama2c import PIECES, write_llama2c_bin, write_llama2c_tokenizer
from test_tokenizer import write_llama3_model

LLAMA3_VOCAB = 260 + 256  # write_llama3_model's 260 ranks and Llama 3's 256 special tokens


def hf_gpt2(folder):
    folder.mkdir()
    train_gpt2_files(folder)
    tiny_gpt2(folder, vocab_size=400)
    rm = folder.parent / "rm"  # a GPT-2 reward model with the same tokenizer
    rm.mkdir()
    train_gpt2_files(rm)
    tiny_gpt2(rm, cls_head=True, vocab_size=400, seed=1)
    return str(folder), f"rm:{rm}"


def hf_llama(folder):
    tiny_llama(folder, n_kv_head=2, vocab_size=LLAMA3_VOCAB)
    write_llama3_model(folder / "tokenizer.model")
    return str(folder), "sentiment"


def meta(folder):
    ref = tiny_llama(folder.parent / "hf", n_kv_head=2, vocab_size=LLAMA3_VOCAB)
    write_meta_folder(folder, ref.state_dict(), n_shards=2, use_scaled_rope=False)
    write_llama3_model(folder / "tokenizer.model")
    return str(folder), "sentiment"


def llama2c(folder):
    folder.mkdir()
    ref = tiny_llama(folder.parent / "hf", n_kv_head=2, rope_theta=10000.0, vocab_size=259 + len(PIECES))
    write_llama2c_bin(folder / "model.bin", ref, version=1, shared=False)
    write_llama2c_tokenizer(folder / "tokenizer.bin")
    return str(folder / "model.bin"), "sentiment"


def falcon(folder):
    tiny_falcon(folder, vocab_size=400)
    train_gpt2_files(folder)
    return str(folder), "sentiment"


@pytest.mark.parametrize("write", [hf_gpt2, hf_llama, meta, llama2c, falcon], ids=lambda f: f.__name__)
def test_train_value_then_generate(write, tmp_path):
    model, reward = write(tmp_path / "model")
    value = str(tmp_path / "value.pt")
    common = ["--model", model, "--reward", reward, "--max-new-tokens", "6"]
    history = train_value.main(common + ["--prompts", "toy-train", "--out", value, "--samples-per-prompt", "1",
                                         "--epochs", "2", "--calibration-samples", "1"])
    assert len(history) == 2 and os.path.exists(value)
    assert torch.load(value, weights_only=True)["base_model"] == model
    base, controlled = generate.main(common + ["--prompts", "toy-test", "--value", value])
    for row in (base, controlled):  # the fluency side is measured on every model, not only the toy world's
        assert all(row[k] == row[k] for k in ("reward", "perplexity", "coherence", "diversity")), row
