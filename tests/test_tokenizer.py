"""load_tokenizer against transformers' GPT2Tokenizer, and the Llama-3 tiktoken format, all made offline."""

import base64
import builtins
import json

import pytest
import torch

from conftest import TOKENIZER_TEXTS as TEXTS, train_gpt2_files
from plumbing.tokenizer import byte_encoding, end_of_sequence_ids, load_tokenizer, save_tokenizer

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


def write_sentencepiece_folder(folder, add_bos=True):
    """A tokenizer.json in the shape of Llama 2's (Metaspace pieces, <s> and </s> specials) and its config."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "h": 4, "e": 5, "l": 6, "o": 7, "w": 8, "r": 9, "d": 10,
             "he": 11, "ll": 12, "hell": 13, "hello": 14, "▁hello": 15, "▁w": 16, "or": 17, "ld": 18, "▁world": 19}
    merges = [("l", "l"), ("h", "e"), ("he", "ll"), ("hell", "o"), ("▁", "hello"), ("▁", "w"), ("o", "r"),
              ("l", "d"), ("▁w", "or"), ("▁wor", "ld")]
    vocab["▁wor"] = 20
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens([AddedToken("<unk>", special=True), AddedToken("<s>", special=True),
                            AddedToken("</s>", special=True)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": add_bos, "bos_token": "<s>"}))


def make_tokenizer(kind, folder):
    if kind == "gpt2":
        train_gpt2_files(folder)
    elif kind == "llama3":  # with Llama 3's tokenizer.json template, which puts <|begin_of_text|> first
        write_llama3_model(folder / "tokenizer.model")
        template = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|begin_of_text|>"}},
                                                             {"Sequence": {"id": "A"}}]}
        (folder / "tokenizer.json").write_text(json.dumps({"post_processor": template}))
    elif kind == "sentencepiece":
        write_sentencepiece_folder(folder)
    elif kind == "sentencepiece-model":
        train_sentencepiece_model(folder)
    elif kind == "llama2c":
        from test_llama2c import write_llama2c_tokenizer
        write_llama2c_tokenizer(folder / "tokenizer.bin")
    else:
        save_tokenizer(byte_encoding([" hello", " world"]), str(folder))
    return load_tokenizer(str(folder))


@pytest.mark.parametrize("kind", ["gpt2", "llama3", "sentencepiece", "sentencepiece-model", "llama2c", "ours"])
def test_prompt_text_plus_response_text_is_the_text_of_prompt_plus_response_tokens(kind, tmp_path):
    from generate import SamplingConfig, sample
    from model import GPT, GPTConfig
    enc = make_tokenizer(kind, tmp_path)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    prompt = "hello world"
    ids = enc.encode(prompt)
    assert enc.decode(ids) == prompt  # BOS and the dummy-prefix space are not text
    out = sample(model, [ids] * 4, SamplingConfig(max_new_tokens=12, eos_ids=[]), tokenizer=enc, seed=0)
    for tokens, text in zip(out.tokens, out.texts):
        assert prompt + text == enc.decode(ids + tokens), (kind, text)


def test_bos_comes_first_where_the_checkpoint_says_so(tmp_path):
    for kind, bos in [("sentencepiece", "<s>"), ("sentencepiece-model", "<s>"), ("llama3", "<|begin_of_text|>"),
                      ("llama2c", "<s>")]:
        (tmp_path / kind).mkdir()
        enc = make_tokenizer(kind, tmp_path / kind)
        assert enc.encode("hello")[0] == enc.encode_single_token(bos), kind
    (tmp_path / "gpt2").mkdir()
    enc = make_tokenizer("gpt2", tmp_path / "gpt2")  # GPT-2 has no BOS
    assert enc.encode("hello") == enc.encode("hello", allowed_special="all") and enc.decode(enc.encode("hello")) == "hello"
    (tmp_path / "no-bos").mkdir()
    write_sentencepiece_folder(tmp_path / "no-bos", add_bos=False)
    assert load_tokenizer(str(tmp_path / "no-bos")).encode("hello") == [15]


def test_special_tokens_typed_in_text_follow_tiktokens_rule(tmp_path):
    write_sentencepiece_folder(tmp_path)
    enc = load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="contains the special token '<s>'"):
        enc.encode("hello <s>")
    assert enc.encode("hello</s>", allowed_special="all")[-1] == 2  # parsed as the special
    assert 2 not in enc.encode("hello</s>", disallowed_special=())  # kept as text


def train_sentencepiece_model(folder):
    """A sentencepiece BPE model trained here the way Llama 2's and llama2.c's were: byte fallback, identity
    normalization, spaces kept, a dummy prefix."""
    import sentencepiece as spm
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(TEXTS[:-1] * 3 + ["the quick brown fox jumps over the lazy dog"] * 30))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"), model_type="bpe",
                                   vocab_size=420, byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, add_dummy_prefix=True, character_coverage=0.9995,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, split_digits=True, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


def test_sentencepiece_model_file_encodes_as_sentencepiece(tmp_path):
    ref = train_sentencepiece_model(tmp_path)
    enc = load_tokenizer(str(tmp_path))
    texts = TEXTS + ["ünïcödé and 日本 never seen in training", "the lazy dog, the quick fox", "a  b   c"]
    for text in texts:
        ids = enc.encode(text, disallowed_special=())
        assert ids == [1] + ref.encode(text), text
        assert enc.decode(ids) == text
    assert enc.encode_single_token("</s>") == 2 and enc.n_vocab == ref.get_piece_size()


@pytest.mark.parametrize("kind, stops", [("sentencepiece", ("o ", "ld")), ("gpt2", ("e ", "th")),
                                         ("llama2c", ("l", "o w"))])
def test_stop_strings_cut_where_reading_the_whole_text_at_every_step_would(kind, stops, tmp_path):
    # only rows whose new token can complete a stop string are read, and only their newest tokens: the cuts must
    # be those of reading each whole response at every step (cut_at_stop on the uncut response)
    from generate import SamplingConfig, sample
    from plumbing.stop_strings import cut_at_stop
    from model import GPT, GPTConfig
    enc = make_tokenizer(kind, tmp_path)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    prompts = [enc.encode("hello world")] * 16
    uncut = sample(model, prompts, SamplingConfig(max_new_tokens=24, eos_ids=[]), tokenizer=enc, seed=1)
    cut = sample(model, prompts, SamplingConfig(max_new_tokens=24, eos_ids=[], stop=stops), tokenizer=enc, seed=1)
    expected = [cut_at_stop(t, enc, stops) for t in uncut.tokens]
    assert sum(n is not None for n in expected) >= 4  # the stop strings do occur
    for tokens, n, got in zip(uncut.tokens, expected, cut.tokens):
        assert got == (tokens if n is None else tokens[:n])
