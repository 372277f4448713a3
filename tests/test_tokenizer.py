"""load_tokenizer against transformers' GPT2Tokenizer, and the Llama-3 tiktoken format, all made offline."""

import base64
import builtins
import json

import pytest

from conftest import TOKENIZER_TEXTS as TEXTS, train_gpt2_files
from tokenizer import byte_encoding, end_of_sequence_ids, load_tokenizer, save_tokenizer

def test_gpt2_format_matches_transformers(tmp_path):
    from transformers import GPT2Tokenizer
    train_gpt2_files(tmp_path)
    ref = GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    enc = load_tokenizer(str(tmp_path))
    for text in TEXTS:
        ids = enc.encode(text, allowed_special="all")  # transformers always reads <|endoftext|> as special
        assert ids == ref.encode(text), text
        assert enc.decode(ids) == text
    assert enc.encode("<|endoftext|>", allowed_special="all") == [ref.convert_tokens_to_ids("<|endoftext|>")]
    assert end_of_sequence_ids(enc) == [ref.convert_tokens_to_ids("<|endoftext|>")]


def test_gpt2_legacy_file_names(tmp_path):
    train_gpt2_files(tmp_path)
    (tmp_path / "vocab.json").rename(tmp_path / "encoder.json")
    merges = (tmp_path / "merges.txt").read_text()
    (tmp_path / "merges.txt").unlink()
    (tmp_path / "vocab.bpe").write_text(merges)
    enc = load_tokenizer(str(tmp_path))
    assert enc.decode(enc.encode(TEXTS[0])) == TEXTS[0]


def write_llama3_model(path, extra_merges=(b"he", b"ll", b"llo", b" w")):
    ranks = [bytes([b]) for b in range(256)] + list(extra_merges)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    return len(ranks)


@pytest.mark.parametrize("under_original", [False, True])
def test_llama3_format_round_trips_and_places_specials(tmp_path, under_original):
    folder = tmp_path / "original" if under_original else tmp_path
    folder.mkdir(exist_ok=True)
    n = write_llama3_model(folder / "tokenizer.model")
    enc = load_tokenizer(str(tmp_path))
    for text in TEXTS:
        assert enc.decode(enc.encode(text, disallowed_special=())) == text
    assert enc.encode("hello") == [256, 258]  # "he" + "llo" (itself "ll" + "o")
    assert enc.encode_single_token("<|begin_of_text|>") == n
    assert enc.encode_single_token("<|eot_id|>") == n + 9
    assert enc.n_vocab == n + 256
    chat = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>"
    ids = enc.encode(chat, allowed_special="all")
    assert ids[0] == n and ids[1] == n + 6 and ids[-1] == n + 9
    assert n + 9 in end_of_sequence_ids(enc) and n + 1 in end_of_sequence_ids(enc)


def test_llama3_specials_from_tokenizer_config(tmp_path):
    n = write_llama3_model(tmp_path / "tokenizer.model")
    added = {str(n): {"content": "<|begin_of_text|>"}, str(n + 1): {"content": "<|end_of_text|>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    enc = load_tokenizer(str(tmp_path))
    assert enc.encode("<|end_of_text|>", allowed_special="all") == [n + 1]


def test_byte_encoding_save_load_round_trip(tmp_path):
    enc = byte_encoding([" great", " awful", "the"], name="toy")
    save_tokenizer(enc, str(tmp_path))
    loaded = load_tokenizer(str(tmp_path))
    text = "the movie was great, not awful: the 😀"
    assert loaded.encode(text) == enc.encode(text)
    assert enc.encode(" great") == [256] and loaded.decode(loaded.encode(text)) == text
    assert loaded.encode("<|endoftext|>", allowed_special="all") == [259]


def test_sentencepiece_tokenizer_json_via_tokenizers(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2, "▁": 3}, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.save(str(tmp_path / "tokenizer.json"))
    enc = load_tokenizer(str(tmp_path))
    assert enc.encode("ab") == [3, 2] and enc.decode([3, 2]) == "ab"


def test_sentencepiece_without_tokenizers_package_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text("{}")
    real_import = builtins.__import__

    def no_tokenizers(name, *args, **kwargs):
        if name == "tokenizers":
            raise ImportError("no module named tokenizers")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_tokenizers)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        load_tokenizer(str(tmp_path))


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no tokenizer files we can read"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.model").write_text("aGVsbG8= 0\nnot-a-pair\n")
    with pytest.raises(ValueError, match=r"tokenizer.model, line 2: expected '<base64 token> <rank>'"):
        load_tokenizer(str(tmp_path))


def test_gpt2_vocab_missing_bytes_is_an_error(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="single bytes have no token"):
        load_tokenizer(str(tmp_path))
