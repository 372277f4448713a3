"""
Tokenizers, built offline from the files of a checkpoint folder: text <-> token ids.

Everything is a tiktoken.Encoding (or, for sentencepiece models, an object with the same
encode/decode calls):
- GPT-2's vocab.json + merges.txt (or encoder.json + vocab.bpe) turned into tiktoken's ranks;
- Llama 3's tokenizer.model, which is already in tiktoken's format;
- a Hugging Face tokenizer.json through the optional `tokenizers` package;
- sentencepiece's tokenizer.model (Llama 2, Vicuna) and llama2.c's tokenizer.bin (the TinyStories
  models), read here and encoded as llama2.c does (which is sentencepiece's BPE);
- our own byte-level encodings (the toy world's), written by save_tokenizer.
tiktoken.get_encoding("gpt2") would download its files; nothing here does.
"""

import base64
import json
import os
import re
import struct

import tiktoken

from plumbing.files import read_json, write_text_atomically

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| "
                  r"?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                    "<|reserved_special_token_2|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                    "<|python_tag|>"]
                   # 256 in all (Llama 3.1)
                   + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)])
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "</s>")


def gpt2_byte_alphabet():
    """GPT-2's map from bytes to printable unicode characters, used to write byte strings in
    vocab.json."""
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
                raise ValueError(f"{path}, line {n}: expected '<base64 token> <rank>' (tiktoken "
                                 "format); a sentencepiece tokenizer.model needs its "
                                 "tokenizer.json instead") from None
    return ranks


def gpt2_encoding(folder, vocab_name, merges_name):
    vocab = read_json(os.path.join(folder, vocab_name))
    config_path = os.path.join(folder, "tokenizer_config.json")
    added = read_json(config_path).get("added_tokens_decoder",
                                       {}) if os.path.exists(config_path) else {}
    special_names = {"<|endoftext|>"} | {t["content"] for t in added.values() if t.get("special",
                                                                                       True)}
    byte_of = {c: b for b, c in gpt2_byte_alphabet().items()}
    ranks, specials = {}, {}
    for token, rank in vocab.items():
        if token in special_names:
            specials[token] = rank
            continue
        try:
            ranks[bytes(byte_of[c] for c in token)] = rank
        except KeyError:
            raise ValueError(f"{folder}/{vocab_name}: token {token!r} is not written in GPT-2's "
                             "byte alphabet; this is not a byte-level BPE vocabulary") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{folder}/{vocab_name}: {len(missing)} single bytes have no token (e.g. "
                         f"{missing[0]}); a byte-level BPE needs all 256")
    # tiktoken merges the pair whose result has the lowest id; that is the merges file's order only
    # when the ids of merged tokens grow with their merge's line number (true of GPT-2 and of BPE
    # trainers)
    with open(os.path.join(folder, merges_name), encoding="utf-8") as f:
        merges = [line.split() for line in f if line.strip() and not line.startswith("#version")]
    last = -1
    for n, pair in enumerate(merges):
        if len(pair) != 2:
            raise ValueError(f"{folder}/{merges_name}: line {n + 1} is not a pair of tokens")
        merged = vocab.get(pair[0] + pair[1])
        if merged is None or merged <= last:
            raise ValueError(f"{folder}/{merges_name}: merge {n + 1} {pair} does not produce a "
                             "token whose id grows with the merge order; tiktoken cannot "
                             "represent this vocabulary")
        last = merged
    return tiktoken.Encoding(name=f"gpt2-bpe:{os.path.abspath(folder)}", pat_str=GPT2_PATTERN,
                             mergeable_ranks=ranks, special_tokens=specials)


def llama3_encoding(path, folder):
    ranks = read_tiktoken_ranks(path)
    config_path = os.path.join(folder, "tokenizer_config.json")
    added = read_json(config_path).get("added_tokens_decoder",
                                       {}) if os.path.exists(config_path) else {}
    if added:
        specials = {t["content"]: int(i) for i, t in added.items()}
    else:
        specials = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIALS)}
    return tiktoken.Encoding(name=f"llama3:{os.path.abspath(path)}", pat_str=LLAMA3_PATTERN,
                             mergeable_ranks=ranks, special_tokens=specials)


def special_tokens_in(text, specials, allowed_special, disallowed_special):
    """tiktoken's rule for special tokens typed in text: with allowed_special="all" they are parsed
    as specials (True is returned); a disallowed one in the text is an error; otherwise they are
    encoded as plain text (False)."""
    if allowed_special == "all" or allowed_special:
        return True
    disallowed = specials if disallowed_special == "all" else set(disallowed_special)
    found = sorted(s for s in disallowed if s in text)
    if found:
        raise ValueError(f"the text contains the special token {found[0]!r}; pass "
                         "allowed_special='all' to parse it as that token, or "
                         "disallowed_special=() to encode it as text")
    return False


class HFTokenizer:
    """A tokenizer.json (sentencepiece models: Llama 2, Vicuna) behind tiktoken's encode/decode
    calls. BOS is put first when the folder's tokenizer_config.json says add_bos_token; decoding
    drops special tokens, so the text of prompt + response tokens is the prompt's text followed by
    the response's."""

    def __init__(self, path, bos=None):
        from tokenizers import Tokenizer
        self.tokenizer = Tokenizer.from_file(path)
        self.name = f"tokenizers:{path}"
        self.n_vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)
        added = self.tokenizer.get_added_tokens_decoder().values()
        self.special_tokens_set = {t.content for t in added if t.special}
        self.bos = self.tokenizer.token_to_id(bos) if bos else None

    def encode(self, text, allowed_special=(), disallowed_special="all"):
        parse = special_tokens_in(text, self.special_tokens_set, allowed_special,
                                  disallowed_special)
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


class SentencePieceTokenizer:
    """A sentencepiece BPE vocabulary (Llama 2, Vicuna, llama2.c's TinyStories): pieces and their
    scores, encoded as llama2.c's `encode` does — BOS, a dummy-prefix space, each UTF-8 character as
    a piece (or its bytes as byte pieces), then merges of the adjacent pair whose merged piece
    scores best, until none is left — which is how sentencepiece encodes a BPE model. Pieces are
    bytes with sentencepiece's "▁" written as a space."""

    def __init__(self, pieces, scores, specials, name, text_ids=None, add_bos=True):
        self.pieces, self.scores, self.specials, self.name = pieces, scores, specials, name
        self.n_vocab, self.special_tokens_set, self.add_bos = len(pieces), set(specials), add_bos
        # the pieces text can be made of (text_ids; all of them for llama2.c, as its encode has it)
        self.lookup = {}
        for i in range(len(pieces)) if text_ids is None else text_ids:
            self.lookup.setdefault(pieces[i], i)
        try:
            self.byte_ids = [pieces.index(f"<0x{b:02X}>".encode()) for b in range(256)]
        except ValueError:
            raise ValueError(f"{name}: the vocabulary has no byte pieces <0x00> ... <0xFF> (byte "
                             "fallback)") from None
        self.byte_of = {i: bytes([b]) for b, i in enumerate(self.byte_ids)}

    def encode_plain(self, text, dummy_prefix):
        ids = [self.lookup[b" "]] if dummy_prefix and text and b" " in self.lookup else []
        for char in text:
            piece = char.encode("utf-8")
            # byte fallback
            ids += [self.lookup[piece]] if piece in self.lookup else \
                [self.byte_ids[b] for b in piece]
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
        ids = [self.specials["<s>"]] if self.add_bos else []
        if not special_tokens_in(text, self.special_tokens_set, allowed_special,
                                 disallowed_special):
            return ids + self.encode_plain(text, dummy_prefix=True)
        for n, part in enumerate(re.split("(" + "|".join(map(re.escape, self.specials)) + ")",
                                          text)):
            if part in self.specials:
                ids.append(self.specials[part])
            elif part:
                ids += self.encode_plain(part, dummy_prefix=n == 0)
        return ids

    def decode(self, ids, errors="replace"):
        out, previous = bytearray(), None
        bos, special = self.specials["<s>"], set(self.specials.values())
        for i in ids:
            piece = self.byte_of.get(i, self.pieces[i])  # a byte piece stands for its byte
            if i in special:  # specials are not text
                piece = b""
            elif previous == bos and piece.startswith(b" "):  # nor is the dummy prefix after BOS
                piece = piece[1:]
            out += piece
            previous = i
        return out.decode("utf-8", errors=errors)

    def encode_single_token(self, text):
        return self.specials[text]


def read_llama2c_tokenizer(path):
    """llama2.c's tokenizer.bin: the longest piece's length, then a score, a length and the bytes of
    each piece; <unk>, <s>, </s> (written "\n<s>\n", "\n</s>\n") are ids 0, 1, 2."""
    data = open(path, "rb").read()
    pieces, scores, offset = [], [], 4
    while offset < len(data):
        if offset + 8 > len(data):
            raise ValueError(f"{path} is truncated: it ends inside the entry of piece "
                             f"{len(pieces)}")
        score, length = struct.unpack_from("fi", data, offset)
        pieces.append(data[offset + 8:offset + 8 + length])
        scores.append(score)
        offset += 8 + length
    if len(pieces) < 259:
        raise ValueError(f"{path} holds {len(pieces)} pieces; a llama2.c tokenizer has at least "
                         "259 (<unk>, <s>, </s> and 256 bytes)")
    return SentencePieceTokenizer(pieces, scores, {"<unk>": 0, "<s>": 1, "</s>": 2},
                                  f"llama2c:{os.path.abspath(path)}")


def protobuf_fields(data):
    """(field number, value) of a protobuf message: bytes for length-delimited fields, ints for
    varints, floats."""
    pos = 0

    def varint():
        nonlocal pos
        value = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    while pos < len(data):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, varint()
        elif wire == 2:
            n = varint()
            pos += n
            yield field, data[pos - n:pos]
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            pos += size
            yield field, struct.unpack("<d" if wire == 1 else "<f", data[pos - size:pos])[0]
        else:
            raise ValueError(f"protobuf wire type {wire} is not one sentencepiece uses")


def read_sentencepiece_model(path, add_bos=True):
    """sentencepiece's own tokenizer.model (a protobuf ModelProto): its pieces (field 1: piece,
    score, type) of a BPE model. Text is made of normal and user-defined pieces; <unk>, <s>, </s>
    are its unknown and control ones."""
    try:
        pieces, scores, types = [], [], []
        for field, value in protobuf_fields(open(path, "rb").read()):
            # one SentencePiece: 1 piece, 2 score, 3 type (1 normal, 2 unknown, 3 control, 6 byte)
            if field == 1:
                parts = dict(protobuf_fields(value))
                pieces.append(parts[1].decode("utf-8").replace("\u2581", " ").encode("utf-8"))
                scores.append(parts.get(2, 0.0))
                types.append(parts.get(3, 1))
    except (IndexError, KeyError, UnicodeDecodeError, struct.error):
        raise ValueError(f"{path} is not a sentencepiece model (nor tiktoken's text format)") \
            from None
    specials = {p.decode(): i for i, (p, t) in enumerate(zip(pieces, types)) if t in (2, 3)}
    if "<s>" not in specials:
        raise ValueError(f"{path}: the sentencepiece model has no <s> piece")
    text_ids = [i for i, t in enumerate(types) if t in (1, 4)]
    return SentencePieceTokenizer(pieces, scores, specials,
                                  f"sentencepiece:{os.path.abspath(path)}", text_ids, add_bos)


class WithBOS:
    """A tiktoken encoding whose encode() puts BOS first, for checkpoints whose tokenizer says so
    (Llama 3)."""

    def __init__(self, enc, bos):
        self.enc, self.bos = enc, enc.encode_single_token(bos)

    def encode(self, text, **kwargs):
        return [self.bos] + self.enc.encode(text, **kwargs)

    def decode(self, ids, errors="replace"):
        return self.enc.decode([i for i in ids if i != self.bos], errors=errors)  # BOS is not text

    def __getattr__(self, name):
        return getattr(self.enc, name)


def has_bos_setting(folder):
    path = os.path.join(folder, "tokenizer_config.json")
    return os.path.exists(path) and "add_bos_token" in read_json(path)


def bos_of(folder):
    """The BOS token that the folder's tokenizer puts first, or None: tokenizer_config.json's
    add_bos_token and bos_token, else the first special token of tokenizer.json's post-processing
    template."""
    config_path = os.path.join(folder, "tokenizer_config.json")
    json_path = os.path.join(folder, "tokenizer.json")
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
    """A byte-level encoding for models trained from scratch: 256 byte tokens, then `words` as
    single tokens (each is one piece of the GPT-2 split, e.g. " great"), then <|endoftext|>."""
    ranks = {bytes([b]): b for b in range(256)}
    for w in words:
        ranks.setdefault(w.encode(), len(ranks))
    # tiktoken returns a piece that is itself in the vocabulary as one token before trying any merge
    return tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


def save_tokenizer(enc, folder):
    """Write a tiktoken encoding as tokenizer.model (base64 ranks) and tiktoken.json (split pattern,
    specials)."""
    os.makedirs(folder, exist_ok=True)
    ranks = sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1])
    write_text_atomically(os.path.join(folder, "tokenizer.model"),
                          "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token,
                                  rank in ranks))
    write_text_atomically(os.path.join(folder, "tiktoken.json"),
                          json.dumps({"name": enc.name, "pat_str": enc._pat_str,
                                      "special_tokens": enc._special_tokens}))


def load_tokenizer(folder):
    """A tiktoken.Encoding (or an object with the same encode/decode calls) built offline from a
    checkpoint folder, BOS first where the checkpoint's tokenizer says so. A file is read as
    llama2.c's tokenizer (e.g. tok512.bin)."""
    if os.path.isfile(folder) and folder.endswith(".bin"):
        return read_llama2c_tokenizer(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    path = lambda *p: os.path.join(folder, *p)
    if os.path.exists(path("tiktoken.json")):  # written by save_tokenizer
        meta = read_json(path("tiktoken.json"))
        return tiktoken.Encoding(name=meta["name"], pat_str=meta["pat_str"],
                                 special_tokens=meta["special_tokens"],
                                 mergeable_ranks=read_tiktoken_ranks(path("tokenizer.model")))
    if os.path.exists(path("tokenizer.bin")):  # llama2.c
        return read_llama2c_tokenizer(path("tokenizer.bin"))
    bos = bos_of(folder)
    enc = None
    for model_file in (path("tokenizer.model"), path("original", "tokenizer.model")):
        if os.path.exists(model_file) and enc is None:
            with open(model_file, "rb") as f:
                head = f.read(64)
            if b" " in head.split(b"\n")[0]:  # tiktoken's text format
                enc = llama3_encoding(model_file, folder)
            # sentencepiece's protobuf (Llama 2, Vicuna): BOS first unless the config says not
            else:
                add_bos = bos is not None or not has_bos_setting(folder)
                return read_sentencepiece_model(model_file, add_bos=add_bos)
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
            raise ImportError(f"{folder} has a sentencepiece tokenizer (tokenizer.json); reading "
                              "it needs the optional package: pip install tokenizers") from None
    raise FileNotFoundError(f"{folder} has no tokenizer files we can read: expected vocab.json + "
                            "merges.txt (GPT-2), encoder.json + vocab.bpe, tokenizer.model in "
                            "tiktoken format (Llama 3), tokenizer.bin (llama2.c), tiktoken.json + "
                            "tokenizer.model (ours), or tokenizer.json (with `tokenizers`); or "
                            "name the tokenizer with --tokenizer PATH (a llama2.c model's "
                            "tok512.bin, say)")


def end_of_sequence_ids(enc):
    """The ids of the end-of-sequence specials the encoding knows (EOS_NAMES)."""
    ids = []
    for name in EOS_NAMES:
        try:
            ids.append(enc.encode_single_token(name))
        except KeyError:
            pass
    return ids


def named_tokens(enc, names):
    """Token ids of --eos: each a special token's text ("</s>", "<|eot_id|>") or an id."""
    ids = []
    for name in names:
        try:
            ids.append(int(name) if name.isdigit() else enc.encode_single_token(name))
        except KeyError:
            raise ValueError(f"--eos {name!r} is not one token of this tokenizer; name a special "
                             "token such as '</s>', or give its id") from None
    return ids
