"""llama2.c's files, written here as its export.py writes them: model.bin versions 0, 1 and 2 against transformers'
logits, and tokenizer.bin encoded as llama2.c's encode() does (worked examples, by hand)."""

import struct

import pytest
import torch

from plumbing.checkpoints import from_pretrained
from conftest import tiny_llama
from test_checkpoints import halves_to_meta
from plumbing.tokenizer import read_llama2c_tokenizer


def write_llama2c_bin(path, ref, version, shared):
    """export.py's legacy_export (version 0), version1_export and version2_export, from an HF Llama."""
    state, c = ref.state_dict(), ref.config
    L, dim, hidden = c.num_hidden_layers, c.hidden_size, c.intermediate_size
    n_head, n_kv, hd = c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    layer = lambda name: [state[f"model.layers.{i}.{name}.weight"] for i in range(L)]
    wq = [halves_to_meta(w, n_head) for w in layer("self_attn.q_proj")]  # back to llama2.c's interleaved RoPE
    wk = [halves_to_meta(w, n_kv) for w in layer("self_attn.k_proj")]
    emb, norm = state["model.embed_tokens.weight"], state["model.norm.weight"]
    output = [] if shared else [state["lm_head.weight"]]
    matrices = [emb, *wq, *wk, *layer("self_attn.v_proj"), *layer("self_attn.o_proj"), *layer("mlp.gate_proj"),
                *layer("mlp.down_proj"), *layer("mlp.up_proj")]
    norms = [*layer("input_layernorm"), *layer("post_attention_layernorm"), norm]
    vocab = c.vocab_size
    params = (dim, hidden, L, n_head, n_kv, vocab, c.max_position_embeddings)
    fp32 = lambda ts: b"".join(t.detach().float().contiguous().numpy().tobytes() for t in ts)
    if version == 0:
        header = struct.pack("7i", *params[:5], vocab if shared else -vocab, params[6])
        freqs = torch.zeros(c.max_position_embeddings, hd // 2)  # stored, and ignored by readers
        body = fp32([emb, *norms[:L], *matrices[1:1 + 4 * L], *norms[L:2 * L], *matrices[1 + 4 * L:], norm, freqs,
                     freqs, *output])
    else:
        header = struct.pack("Ii7iB", 0x616B3432, version, *params, int(shared))
        if version == 2:
            header += struct.pack("i", 16)
        header += b"\0" * (256 - len(header))
        if version == 1:
            body = fp32(norms + matrices + output)
        else:  # int8 in groups of 16, each with its fp32 scale
            body = fp32(norms)
            for w in matrices + output:
                groups = w.detach().float().reshape(-1, 16)
                scale = groups.abs().max(1).values / 127.0
                q = torch.round(groups / scale[:, None]).to(torch.int8)
                body += q.numpy().tobytes() + fp32([scale])
    path.write_bytes(header + body)


@pytest.mark.parametrize("version, shared", [(0, True), (0, False), (1, False), (1, True), (2, False)])
def test_model_bin_gives_transformers_logits(version, shared, tmp_path, tokens):
    ref = tiny_llama(tmp_path / "hf", n_kv_head=2, tie=shared, rope_theta=10000.0)
    write_llama2c_bin(tmp_path / "model.bin", ref, version, shared)
    model = from_pretrained(str(tmp_path / "model.bin"))
    assert model.config.tie_embeddings == shared and model.config.eos_token_ids == [2, 1]
    with torch.no_grad():
        error = (model(tokens) - ref(tokens).logits).abs().max().item()
    assert error <= (1e-4 if version < 2 else 0.05), error  # version 2 is int8: a quantization error, no more


def test_a_truncated_model_bin_is_a_clear_error(tmp_path):
    ref = tiny_llama(tmp_path / "hf", n_kv_head=2, rope_theta=10000.0)
    write_llama2c_bin(tmp_path / "model.bin", ref, 1, False)
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="it is truncated or not a llama2.c checkpoint"):
        from_pretrained(str(tmp_path / "model.bin"))


PIECES = [  # (piece, score), after the 3 specials and the 256 bytes, as llama2.c's export writes them
    (" ", -1.0), ("h", -2.0), ("e", -2.0), ("l", -2.0), ("o", -2.0), ("w", -2.0), ("r", -2.0), ("d", -2.0),
    ("ll", -3.0), ("he", -4.0), ("hell", -5.0), ("hello", -6.0), (" hello", -7.0), ("or", -3.5), (" w", -8.0),
    (" wor", -9.0), ("ld", -3.2), (" world", -10.0), ("é", -2.0)]


def write_llama2c_tokenizer(path):
    """A tokenizer.bin as llama2.c's tokenizer.py exports one: the longest piece's length, then each piece's score,
    length and bytes; <unk>, BOS and EOS, then the 256 byte pieces, then PIECES."""
    pieces = [(b"<unk>", 0.0), (b"\n<s>\n", 0.0), (b"\n</s>\n", 0.0)]
    pieces += [(f"<0x{b:02X}>".encode(), 0.0) for b in range(256)] + [(p.encode(), s) for p, s in PIECES]
    data = struct.pack("I", max(len(p) for p, _ in pieces))
    path.write_bytes(data + b"".join(struct.pack("fI", s, len(p)) + p for p, s in pieces))


@pytest.fixture
def llama2c_tokenizer(tmp_path):
    write_llama2c_tokenizer(tmp_path / "tokenizer.bin")
    return read_llama2c_tokenizer(str(tmp_path / "tokenizer.bin"))


def test_tokenizer_bin_encodes_as_llama2c(llama2c_tokenizer):
    enc = llama2c_tokenizer
    id_of = {p: 259 + i for i, (p, _) in enumerate(PIECES)}
    # BOS, then " " + "h e l l o": "ll" (-3) first, then "he" (-4), "hell" (-5), "hello" (-6), " hello" (-7)
    assert enc.encode("hello") == [1, id_of[" hello"]]
    # " w o r l d": "ld" (-3.2) before "or" (-3.5); then " w" (-8) and " wor" (-9); " world" (-10)
    assert enc.encode("hello world") == [1, id_of[" hello"], id_of[" world"]]
    # a character with no piece falls back to its UTF-8 bytes, ids byte + 3; one that has a piece is that piece
    assert enc.encode("hé!") == [1, id_of[" "], id_of["h"], id_of["é"], ord("!") + 3]
    assert enc.encode("ü") == [1, id_of[" "], 0xC3 + 3, 0xBC + 3]
    assert enc.encode("") == [1]  # no dummy prefix for empty text


def test_tokenizer_bin_decodes_and_joins(llama2c_tokenizer):
    enc = llama2c_tokenizer
    for text in ["hello world", "hé! ü", "  two spaces", "hello\nworld"]:
        assert enc.decode(enc.encode(text)) == text
    prompt, response = enc.encode("hello"), enc.encode("hello world")[2:]  # the response " world"
    assert enc.decode(response) == " world"  # its leading space is its own, kept
    assert enc.decode(prompt) + enc.decode(response) == enc.decode(prompt + response) == "hello world"
    with pytest.raises(ValueError, match="contains the special token '<s>'"):
        enc.encode("a <s> b")
    assert enc.encode("hello<s>", allowed_special="all") == [1, 259 + 11 + 1, 1]
