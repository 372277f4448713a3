"""checkpoints.py: every layout it reads gives transformers' logits (HF GPT-2, legacy .bin, Meta shards, sharded
safetensors, half precision on disk), and every broken checkpoint is a clear error that names the problem."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_gpt2, tiny_llama
from plumbing.checkpoints import from_pretrained
from plumbing.files import write_atomically

@pytest.mark.parametrize("zip_format", [True, False])  # False: the pre-1.6 format of the original GPT-2 files
def test_legacy_gpt2_bin_layout_loads(zip_format, tmp_path, tokens):
    ref = tiny_gpt2(tmp_path / "hf")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    state = {k.removeprefix("transformer."): v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):  # the old causal-mask buffers that the legacy files carry
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    (legacy / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    model = from_pretrained(str(legacy))
    with torch.no_grad():
        assert (model(tokens) - ref(tokens).logits).abs().max() <= 1e-4


def halves_to_meta(w, n_heads):
    """The inverse of formats.meta_to_halves: split-halves rows back to Meta's interleaved layout."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def write_meta_folder(folder, hf_state, n_shards, use_scaled_rope):
    """Our own writer of Meta's layout (params.json + consolidated.NN.pth) from an HF Llama state dict."""
    folder.mkdir()
    meta = {"tok_embeddings.weight": hf_state["model.embed_tokens.weight"], "norm.weight": hf_state["model.norm.weight"],
            "output.weight": hf_state["lm_head.weight"]}
    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(2):
        for theirs, ours in names.items():
            w = hf_state[f"model.layers.{i}.{theirs}.weight"]
            if ours == "attention.wq":
                w = halves_to_meta(w, 4)
            if ours == "attention.wk":
                w = halves_to_meta(w, 2)
            meta[f"layers.{i}.{ours}.weight"] = w
    row_parallel = ("attention.wo", "feed_forward.w2")
    for s in range(n_shards):
        shard = {}
        for k, w in meta.items():
            if "norm" in k:
                shard[k] = w.clone()
            elif k.startswith("tok_embeddings") or any(r in k for r in row_parallel):
                shard[k] = w.chunk(n_shards, dim=1)[s].clone()
            else:
                shard[k] = w.chunk(n_shards, dim=0)[s].clone()
        torch.save(shard, folder / f"consolidated.{s:02d}.pth")
    params = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": len(meta["tok_embeddings.weight"]), "norm_eps": 1e-5,
              "rope_theta": 500000.0, "use_scaled_rope": use_scaled_rope, "max_seq_len": 128}
    (folder / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_layout_gives_the_same_logits_as_hf_layout(n_shards, tmp_path, tokens):
    ref = tiny_llama(tmp_path / "hf", n_kv_head=2)
    write_meta_folder(tmp_path / "meta", ref.state_dict(), n_shards, use_scaled_rope=False)
    hf, meta = from_pretrained(str(tmp_path / "hf")), from_pretrained(str(tmp_path / "meta"))
    with torch.no_grad():
        assert (hf(tokens) - meta(tokens)).abs().max() <= 1e-5
        assert (meta(tokens) - ref(tokens).logits).abs().max() <= 1e-4


def test_sharded_safetensors_load(tmp_path, tokens):
    ref = tiny_llama(tmp_path, n_kv_head=2, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = from_pretrained(str(tmp_path))
    with torch.no_grad():
        assert (model(tokens) - ref(tokens).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_disk_and_requested_dtype(dtype, tmp_path, tokens):
    ref = tiny_llama(tmp_path / "fp32")
    ref.to(dtype).save_pretrained(tmp_path / "half")
    assert from_pretrained(str(tmp_path / "half")).wte.weight.dtype == dtype  # as stored
    model = from_pretrained(str(tmp_path / "half"), dtype="float32")
    assert model.wte.weight.dtype == torch.float32
    with torch.no_grad():
        tol = 0.05 if dtype == torch.bfloat16 else 0.01
        assert (model(tokens) - ref(tokens).logits).abs().max() <= tol


def test_error_no_weights_file(tmp_path):
    tiny_gpt2(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no weights: expected model.safetensors"):
        from_pretrained(str(tmp_path))


def test_error_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        from_pretrained(str(tmp_path))


def test_error_unsupported_model_type(tmp_path):
    tiny_gpt2(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="mistral")))
    with pytest.raises(ValueError, match="model_type 'mistral' is not supported"):
        from_pretrained(str(tmp_path))


def test_error_missing_key_names_it(tmp_path):
    tiny_gpt2(tmp_path)
    edit_safetensors(tmp_path / "model.safetensors", lambda s: s.pop("transformer.h.1.mlp.c_fc.weight"))
    with pytest.raises(KeyError, match=r"blocks.1.mlp.fc.weight.*transformer.h.1.mlp.c_fc.weight.*model.safetensors"):
        from_pretrained(str(tmp_path))


def test_error_unexpected_key_names_it(tmp_path):
    tiny_gpt2(tmp_path)
    edit_safetensors(tmp_path / "model.safetensors", lambda s: s.update({"transformer.h.2.ln_1.weight": torch.ones(32)}))
    with pytest.raises(KeyError, match=r"unexpected weights transformer.h.2.ln_1.weight in model.safetensors"):
        from_pretrained(str(tmp_path))


def test_error_shape_mismatch_names_the_key(tmp_path):
    tiny_gpt2(tmp_path)
    edit_safetensors(tmp_path / "model.safetensors", lambda s: s.update({"transformer.wpe.weight": torch.ones(32, 32)}))
    with pytest.raises(ValueError, match=r"transformer.wpe.weight in model.safetensors has shape \(32, 32\)"):
        from_pretrained(str(tmp_path))


def test_error_truncated_safetensors(tmp_path):
    tiny_gpt2(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"model.safetensors could not be read: it is truncated or corrupt"):
        from_pretrained(str(tmp_path))


def test_error_unsupported_dtype(tmp_path):
    tiny_gpt2(tmp_path)
    edit_safetensors(tmp_path / "model.safetensors",
                     lambda s: s.update({"transformer.ln_f.bias": s["transformer.ln_f.bias"].to(torch.float64)}))
    with pytest.raises(ValueError, match=r"transformer.ln_f.bias is stored as torch.float64"):
        from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        from_pretrained(str(tmp_path), dtype="int8")


def test_error_missing_shard_of_an_index(tmp_path):
    tiny_llama(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    os.remove(tmp_path / sorted(set(index["weight_map"].values()))[-1])
    with pytest.raises(FileNotFoundError, match=r"model-0000\d-of-0000\d.safetensors is missing"):
        from_pretrained(str(tmp_path))


def test_error_hub_name_offline_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="could not be fetched from the Hugging Face hub.*Pass a local folder"):
        from_pretrained("openai-community/gpt2")


def edit_safetensors(path, change):
    from safetensors.torch import load_file
    state = load_file(path)
    change(state)
    save_file(state, path)


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "value.pt"
    path.write_text("the old checkpoint")

    def crash(tmp):
        open(tmp, "w").write("half of a new one")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(str(path), crash)
    assert path.read_text() == "the old checkpoint" and os.listdir(tmp_path) == ["value.pt"]
