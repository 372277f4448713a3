"""model.py against transformers: logits, greedy tokens, reward heads, checkpoint layouts, cache and padding."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from conftest import VOCAB, tiny_gpt2, tiny_llama
from checkpoints import from_pretrained
from generate import SamplingConfig, sample
from model import GPT, GPTConfig

CASES = {
    "gpt2": lambda d: tiny_gpt2(d),
    "gpt2-untied": lambda d: tiny_gpt2(d, tie=False),
    "llama-mha": lambda d: tiny_llama(d, n_kv_head=4),
    "llama-gqa": lambda d: tiny_llama(d, n_kv_head=2),
    "llama-gqa-tied": lambda d: tiny_llama(d, n_kv_head=2, tie=True),
    "llama3-rope-scaling": lambda d: tiny_llama(d, n_kv_head=2, rope_scaling=True),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_and_greedy_tokens_match_transformers(case, tmp_path, tokens):
    ref = CASES[case](tmp_path)
    model = from_pretrained(str(tmp_path))
    with torch.no_grad():
        assert (model(tokens) - ref(tokens).logits).abs().max() <= 1e-4
        expected = ref.generate(tokens[:1, :8], max_new_tokens=32, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, 8:].tolist()
    ours = sample(model, [tokens[0, :8].tolist()], SamplingConfig(max_new_tokens=32, temperature=0, eos_ids=[]))
    assert ours.tokens[0] == expected and len(expected) == 32


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_reward_head_scores_match_transformers(family, tmp_path, tokens):
    ref = (tiny_gpt2 if family == "gpt2" else tiny_llama)(tmp_path, cls_head=True)
    model = from_pretrained(str(tmp_path))
    assert model.config.n_labels == 1
    prompts = [tokens[0, :20].tolist(), tokens[1, :11].tolist(), tokens[2, :5].tolist()]
    from model import left_pad
    idx, mask = left_pad(prompts, "cpu")
    with torch.no_grad():
        ours = model.reward_scores(idx, mask)
        for i, p in enumerate(prompts):  # each alone: the reference has no position ids for left padding
            expected = ref(torch.tensor([p])).logits[0]
            assert (ours[i] - expected).abs().max() <= 1e-4


def test_legacy_gpt2_bin_layout_loads(tmp_path, tokens):
    ref = tiny_gpt2(tmp_path / "hf")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    state = {k.removeprefix("transformer."): v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):  # the old causal-mask buffers that the legacy files carry
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, legacy / "pytorch_model.bin")
    (legacy / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    model = from_pretrained(str(legacy))
    with torch.no_grad():
        assert (model(tokens) - ref(tokens).logits).abs().max() <= 1e-4


def halves_to_meta(w, n_heads):
    """The inverse of model.meta_to_halves: split-halves rows back to Meta's interleaved layout."""
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
    params = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": VOCAB, "norm_eps": 1e-5,
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


def random_model(kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT(GPTConfig(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_embd=32)).eval()
    return GPT(GPTConfig.preset("llama-3.2-1b", vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                                n_embd=32, intermediate_size=64)).eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_cached_decoding_equals_full_recompute(kind, tokens):
    model = random_model(kind)
    with torch.no_grad():
        full = model.states(tokens)
        cache = model.new_cache(3, 20)
        step_by_step = [model.states(tokens[:, :7], cache)]  # a prefill, then one token at a time
        step_by_step += [model.states(tokens[:, t:t + 1], cache) for t in range(7, 20)]
        assert (torch.cat(step_by_step, dim=1) - full).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_batched_with_left_padding_equals_one_by_one(kind, tokens):
    model = random_model(kind)
    prompts = [tokens[0, :3].tolist(), tokens[1, :12].tolist(), tokens[2, :7].tolist()]
    batch = sample(model, prompts, SamplingConfig(max_new_tokens=10, temperature=0, eos_ids=[]), record_states=True)
    for i, p in enumerate(prompts):
        alone = sample(model, [p], SamplingConfig(max_new_tokens=10, temperature=0, eos_ids=[]), record_states=True)
        assert batch.tokens[i] == alone.tokens[0]
        assert (batch.states[i] - alone.states[0]).abs().max() <= 1e-5


def test_eos_and_stop_strings_cut_the_response_and_its_states():
    model = random_model("gpt2")
    first = sample(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=12, temperature=0, eos_ids=[]), record_states=True)
    y = first.tokens[0]
    eos_at = 5
    cut = sample(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=12, temperature=0, eos_ids=[y[eos_at]]), record_states=True)
    k = y.index(y[eos_at])
    assert cut.tokens[0] == y[:k] and cut.states[0].shape[0] == k + 1
    assert (cut.states[0] - first.states[0][:k + 1]).abs().max() == 0

    class Chars:  # a toy tokenizer: token i is the character chr(65 + i % 26)
        def decode(self, ids):
            return "".join(chr(65 + i % 26) for i in ids)
    text = Chars().decode(y)
    stop = text[6:8]
    cut = sample(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=12, temperature=0, eos_ids=[], stop=[stop]), tokenizer=Chars())
    assert cut.texts[0] == text[:text.find(stop)]


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = random_model("llama")
    a = sample(model, [[1, 2], [3]], SamplingConfig(max_new_tokens=8, temperature=1.0, eos_ids=[]), seed=3)
    b = sample(model, [[1, 2], [3]], SamplingConfig(max_new_tokens=8, temperature=1.0, eos_ids=[]), seed=3)
    assert a.tokens == b.tokens
    greedy = sample(model, [[1, 2], [3]], SamplingConfig(max_new_tokens=8, temperature=0, eos_ids=[]))
    assert sample(model, [[1, 2], [3]], SamplingConfig(max_new_tokens=8, top_k=1, eos_ids=[]), seed=5).tokens == greedy.tokens
    assert sample(model, [[1, 2], [3]], SamplingConfig(max_new_tokens=8, top_p=1e-6, eos_ids=[]), seed=5).tokens == greedy.tokens


def test_top_p_keeps_exactly_the_nucleus():
    from generate import next_token
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {next_token(logits, 1.0, None, 0.7, g).item() for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.7 so the second token is needed; 0.8 >= 0.7 so no third


def test_presets_build():
    config = GPTConfig.preset("llama-3.1-8b")
    assert config.n_kv_head == 8 and config.head_dim == 128 and config.rope_scaling["factor"] == 8.0
    assert GPTConfig.preset("gpt2-xl").n_embd == 1600
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.preset("gpt5")


def test_prompt_longer_than_context_is_a_clear_error():
    model = random_model("gpt2")
    with pytest.raises(ValueError, match="exceeds the context of 64"):
        sample(model, [list(range(1, 60))], SamplingConfig(max_new_tokens=10))


# ---- errors name the file and the key ------------------------------------------------------------------


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


def edit_safetensors(path, change):
    from safetensors.torch import load_file
    state = load_file(path)
    change(state)
    save_file(state, path)


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
