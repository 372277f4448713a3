"""
Tokenizers, built offline from the files of a checkpoint folder: text <-> token ids.

Everything is a tiktoken.Encoding (or, for sentencepiece models, an object with the same encode/decode calls):
- GPT-2's vocab.json + merges.txt (or encoder.json + vocab.bpe) turned into tiktoken's ranks;
- Llama 3's tokenizer.model, which is already in tiktoken's format;
- sentencepiece's tokenizer.json (Llama 2, Vicuna) through the optional `tokenizers` package;
- llama2.c's tokenizer.bin (the TinyStories models), encoded exactly as llama2.c does;
- our own byte-level encodings (the toy world's), written by save_tokenizer.
tiktoken.get_encoding("gpt2") would download its files; nothing here does.
"""

import base64
import json
import os
import re
import struct

import tiktoken

from checkpoints import write_text_atomically
from formats import read_json

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)])  # 256 in all (Llama 3.1)
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "</s>")


def gpt2_byte_alphabet():
    """GPT-2's map from bytes to printable unicode characters, used to write byte strings in vocab.json."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:  # unprintable bytes are shifted above 255
            chars[b] = chr(256 + n)
            n += 1
    return chars


def read_tiktoken_ranks(path):
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}, line {n}: expected '<base64 token> <rank>' (tiktoken format); "
                                 "a sentencepiece tokenizer.model needs its tokenizer.json instead") from None
    return ranks


def gpt2_encoding(folder, vocab_name, merges_name):
    vocab = read_json(os.path.join(folder, vocab_name))
    config_path = os.path.join(folder, "tokenizer_config.json")
    added = read_json(config_path).get("added_tokens_decoder", {}) if os.path.exists(config_path) else {}
    special_names = {"<|endoftext|>"} | {t["content"] for t in added.values() if t.get("special", True)}
    byte_of = {c: b for b, c in gpt2_byte_alphabet().items()}
    ranks, specials = {}, {}
    for token, rank in vocab.items():
        if token in special_names:
            specials[token] = rank
            continue
        try:
            ranks[bytes(byte_of[c] for c in token)] = rank
        except KeyError:
            raise ValueError(f"{folder}/{vocab_name}: token {token!r} is not written in GPT-2's byte alphabet; "
                             "this is not a byte-level BPE vocabulary") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{folder}/{vocab_name}: {len(missing)} single bytes have no token (e.g. {missing[0]}); "
                         "a byte-level BPE needs all 256")
    # tiktoken merges the pair whose result has the lowest id; that is the merges file's order only when
    # the ids of merged tokens grow with their merge's line number (true of GPT-2 and of BPE trainers)
    with open(os.path.join(folder, merges_name), encoding="utf-8") as f:
        merges = [line.split() for line in f if line.strip() and not line.startswith("#version")]
    last = -1
    for n, pair in enumerate(merges):
        if len(pair) != 2:
            raise ValueError(f"{folder}/{merges_name}: line {n + 1} is not a pair of tokens")
        merged = vocab.get(pair[0] + pair[1])
        if merged is None or merged <= last:
            raise ValueError(f"{folder}/{merges_name}: merge {n + 1} {pair} does not produce a token whose id "
                             "grows with the merge order; tiktoken cannot represent this vocabulary")
        last = merged
    return tiktoken.Encoding(name=f"gpt2-bpe:{os.path.abspath(folder)}", pat_str=GPT2_PATTERN,
                             mergeable_ranks=ranks, special_tokens=specials)


def llama3_encoding(path, folder):
    ranks = read_tiktoken_ranks(path)
    config_path = os.path.join(folder, "tokenizer_config.json")
    added = read_json(config_path).get("added_tokens_decoder", {}) if os.path.exists(config_path) else {}
    if added:
        specials = {t["content"]: int(i) for i, t in added.items()}
    else:
        specials = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIALS)}
    return tiktoken.Encoding(name=f"llama3:{os.path.abspath(path)}", pat_str=LLAMA3_PATTERN,
                             mergeable_ranks=ranks, special_tokens=specials)


def special_tokens_in(text, specials, allowed_special, disallowed_special):
    """tiktoken's rule for special tokens typed in text: with allowed_special="all" they are parsed as specials (True
    is returned); a disallowed one in the text is an error; otherwise they are encoded as plain text (False)."""
    if allowed_special == "all" or allowed_special:
        return True
    disallowed = specials if disallowed_special == "all" else set(disallowed_special)
    found = sorted(s for s in disallowed if s in text)
    if found:
        raise ValueError(f"the text contains the special token {found[0]!r}; pass allowed_special='all' to parse it "
                         "as that token, or disallowed_special=() to encode it as text")
    return False


class HFTokenizer:
    """A tokenizer.json (sentencepiece models: Llama 2, Vicuna) behind tiktoken's encode/decode calls. BOS is put
    first when the folder's tokenizer_config.json says add_bos_token; decoding drops special tokens, so the text of
    prompt + response tokens is the prompt's text followed by the response's."""

    def __init__(self, path, bos=None):
        from tokenizers import Tokenizer
        self.tokenizer = Tokenizer.from_file(path)
        self.name = f"tokenizers:{path}"
        self.n_vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_tokens_set = {t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special}
        self.bos = self.tokenizer.token_to_id(bos) if bos else None

    def encode(self, text, allowed_special=(), disallowed_special="all"):
        parse = special_tokens_in(text, self.special_tokens_set, allowed_special, disallowed_special)
        self.tokenizer.encode_special_tokens = not parse  # True: "<s>" typed in the text stays text
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ([self.bos] if self.bos is not None else []) + ids

    def decode(self, ids, errors="replace"):
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def encode_single_token(self, text):
        token = self.tokenizer.token_to_id(text)
        if token is None:
            raise KeyError(text)
        return token


class Llama2cTokenizer:
    """llama2.c's tokenizer.bin (its export of a sentencepiece model: a score and the bytes of each piece), encoding as
    llama2.c's `encode` does: BOS (id 1), a dummy-prefix space, each UTF-8 character as a piece (or its bytes, ids
    3..258), then merges of the adjacent pair whose merged piece scores best, until none is left."""

    BOS, EOS = 1, 2

    def __init__(self, path):
        data = open(path, "rb").read()
        self.pieces, self.scores = [], []
        offset = 4  # after the longest piece's length
        while offset < len(data):
            if offset + 8 > len(data):
                raise ValueError(f"{path} is truncated: it ends inside the entry of piece {len(self.pieces)}")
            score, length = struct.unpack_from("fi", data, offset)
            self.pieces.append(data[offset + 8:offset + 8 + length])
            self.scores.append(score)
            offset += 8 + length
        if len(self.pieces) < 259:
            raise ValueError(f"{path} holds {len(self.pieces)} pieces; a llama2.c tokenizer has at least 259 "
                             "(<unk>, <s>, </s> and 256 bytes)")
        self.lookup = {}
        for i, piece in enumerate(self.pieces):
            self.lookup.setdefault(piece, i)
        self.name, self.n_vocab = f"llama2c:{os.path.abspath(path)}", len(self.pieces)
        self.special_tokens_set = {"<unk>", "<s>", "</s>"}

    def encode_plain(self, text, dummy_prefix):
        ids = [self.lookup[b" "]] if dummy_prefix and text and b" " in self.lookup else []
        for char in text:
            piece = char.encode("utf-8")
            ids += [self.lookup[piece]] if piece in self.lookup else [b + 3 for b in piece]  # byte fallback
        while True:  # merge the best-scoring adjacent pair (the first one on a tie)
            best, at = None, -1
            for i in range(len(ids) - 1):
                merged = self.lookup.get(self.pieces[ids[i]] + self.pieces[ids[i + 1]])
                if merged is not None and (best is None or self.scores[merged] > self.scores[best]):
                    best, at = merged, i
            if best is None:
                return ids
            ids[at:at + 2] = [best]

    def encode(self, text, allowed_special=(), disallowed_special="all"):
        ids = [self.BOS]
        if not special_tokens_in(text, self.special_tokens_set, allowed_special, disallowed_special):
            return ids + self.encode_plain(text, dummy_prefix=True)
        for n, part in enumerate(re.split(r"(<unk>|<s>|</s>)", text)):
            if part in self.special_tokens_set:
                ids.append(self.encode_single_token(part))
            elif part:
                ids += self.encode_plain(part, dummy_prefix=n == 0)
        return ids

    def decode(self, ids, errors="replace"):
        out, previous = bytearray(), None
        for i in ids:
            piece = self.pieces[i]
            if i in (0, self.BOS, self.EOS):  # specials are not text
                piece = b""
            elif previous == self.BOS and piece.startswith(b" "):  # the dummy prefix after BOS is not text either
                piece = piece[1:]
            elif re.fullmatch(rb"<0x[0-9A-Fa-f]{2}>", piece):  # a byte-fallback piece stands for that byte
                piece = bytes([int(piece[3:5], 16)])
            out += piece
            previous = i
        return out.decode("utf-8", errors=errors)

    def encode_single_token(self, text):
        ids = {"<unk>": 0, "<s>": self.BOS, "</s>": self.EOS}
        if text not in ids:
            raise KeyError(text)
        return ids[text]


class WithBOS:
    """A tiktoken encoding whose encode() puts BOS first, for checkpoints whose tokenizer says so (Llama 3)."""

    def __init__(self, enc, bos):
        self.enc, self.bos = enc, enc.encode_single_token(bos)

    def encode(self, text, **kwargs):
        return [self.bos] + self.enc.encode(text, **kwargs)

    def decode(self, ids, errors="replace"):
        return self.enc.decode([i for i in ids if i != self.bos], errors=errors)  # BOS is not text

    def __getattr__(self, name):
        return getattr(self.enc, name)


def bos_of(folder):
    """The BOS token that the folder's tokenizer puts first, or None: tokenizer_config.json's add_bos_token and
    bos_token, else the first special token of tokenizer.json's post-processing template."""
    config_path, json_path = os.path.join(folder, "tokenizer_config.json"), os.path.join(folder, "tokenizer.json")
    config = read_json(config_path) if os.path.exists(config_path) else {}
    bos = config.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    if "add_bos_token" in config:
        return bos if config["add_bos_token"] else None
    if not os.path.exists(json_path):
        return None
    processors = [read_json(json_path).get("post_processor") or {}]
    while processors:
        p = processors.pop()
        processors += p.get("processors") or []
        first = (p.get("single") or [{}])[0] if p.get("type") == "TemplateProcessing" else {}
        if "SpecialToken" in first:
            return first["SpecialToken"]["id"]
    return None


def byte_encoding(words=(), name="bytes"):
    """A byte-level encoding for models trained from scratch: 256 byte tokens, then `words` as single tokens
    (each is one piece of the GPT-2 split, e.g. " great"), then <|endoftext|>."""
    ranks = {bytes([b]): b for b in range(256)}
    for w in words:
        ranks.setdefault(w.encode(), len(ranks))
    # tiktoken returns a piece that is itself in the vocabulary as one token before trying any merge
    return tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


def save_tokenizer(enc, folder):
    """Write a tiktoken encoding as tokenizer.model (base64 ranks) and tiktoken.json (split pattern, specials)."""
    os.makedirs(folder, exist_ok=True)
    ranks = sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1])
    write_text_atomically(os.path.join(folder, "tokenizer.model"),
                          "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks))
    write_text_atomically(os.path.join(folder, "tiktoken.json"),
                          json.dumps({"name": enc.name, "pat_str": enc._pat_str,
                                      "special_tokens": enc._special_tokens}))


def load_tokenizer(folder):
    """A tiktoken.Encoding (or an object with the same encode/decode calls) built offline from a checkpoint folder,
    BOS first where the checkpoint's tokenizer says so."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    path = lambda *p: os.path.join(folder, *p)
    if os.path.exists(path("tiktoken.json")):  # written by save_tokenizer
        meta = read_json(path("tiktoken.json"))
        return tiktoken.Encoding(name=meta["name"], pat_str=meta["pat_str"], special_tokens=meta["special_tokens"],
                                 mergeable_ranks=read_tiktoken_ranks(path("tokenizer.model")))
    if os.path.exists(path("tokenizer.bin")):  # llama2.c
        return Llama2cTokenizer(path("tokenizer.bin"))
    bos = bos_of(folder)
    enc = None
    for model_file in (path("tokenizer.model"), path("original", "tokenizer.model")):
        if os.path.exists(model_file) and enc is None:
            with open(model_file, "rb") as f:
                head = f.read(64)
            if b" " in head.split(b"\n")[0]:  # tiktoken's text format; sentencepiece's is binary protobuf
                enc = llama3_encoding(model_file, folder)
    if enc is None and os.path.exists(path("vocab.json")) and os.path.exists(path("merges.txt")):
        enc = gpt2_encoding(folder, "vocab.json", "merges.txt")
    if enc is None and os.path.exists(path("encoder.json")) and os.path.exists(path("vocab.bpe")):
        enc = gpt2_encoding(folder, "encoder.json", "vocab.bpe")
    if enc is not None:
        return WithBOS(enc, bos) if bos else enc
    if os.path.exists(path("tokenizer.json")):
        try:
            return HFTokenizer(path("tokenizer.json"), bos)
        except ImportError:
            raise ImportError(f"{folder} has a sentencepiece tokenizer (tokenizer.json); reading it needs the "
                              "optional package: pip install tokenizers") from None
    raise FileNotFoundError(f"{folder} has no tokenizer files we can read: expected vocab.json + merges.txt "
                            "(GPT-2), encoder.json + vocab.bpe, tokenizer.model in tiktoken format (Llama 3), "
                            "tokenizer.bin (llama2.c), tiktoken.json + tokenizer.model (ours), or tokenizer.json "
                            "(with `tokenizers`)")


def end_of_sequence_ids(enc):
    """The ids of the end-of-sequence specials the encoding knows (EOS_NAMES)."""
    ids = []
    for name in EOS_NAMES:
        try:
            ids.append(enc.encode_single_token(name))
        except KeyError:
            pass
    return ids
