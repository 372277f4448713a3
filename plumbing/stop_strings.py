"""
Stop strings ("Human:"): where the text of a response first holds one, the response ends, cut before
it.

Reading every row's text at every step would cost more than the model on a small one, so only rows
whose new token can complete a stop string are read, and only their newest tokens.
"""

import weakref

import torch

# tokenizer -> {stop strings: the token ids that can complete one}
FINISHERS = weakref.WeakKeyDictionary()


def token_text(tokenizer, i):
    """The text of token i alone; "\ufffd" for an id the tokenizer cannot decode (a model's
    vocabulary can be padded beyond its tokenizer's)."""
    try:
        return tokenizer.decode([i])
    except (KeyError, ValueError, IndexError):
        return "\ufffd"


def stop_finishers(tokenizer, stop_strings, vocab_size, device):
    """The ids of the tokens that can complete a stop string: those whose text holds the last
    character of one, and those that are a byte of a longer character ("\ufffd" alone). Every token,
    when a stop string ends in white space: a decoder may drop a token's leading space when it reads
    the token alone (sentencepiece's "▁he"). Only a row that draws one of them is read."""
    cache = FINISHERS.setdefault(tokenizer, {})
    if (stop_strings, vocab_size) not in cache:
        ends = {s[-1] for s in stop_strings} | {"\ufffd"}
        cache[stop_strings,
              vocab_size] = [i for i in range(vocab_size) if any(c.isspace() for c in ends)
                                           or any(c in token_text(tokenizer, i) for c in ends)]
    return torch.tensor(cache[stop_strings, vocab_size] or [-1], device=device)


def cut_at_stop(tokens, enc, stop_strings):
    """The longest token prefix whose text ends before the first stop string (None: no stop string
    in it)."""
    text = enc.decode(tokens)
    hits = [text.find(s) for s in stop_strings if s in text]
    if not hits:
        return None
    end = min(hits)  # the first character of the earliest stop string
    n = len(tokens)
    while n and len(enc.decode(tokens[:n])) > end:
        n -= 1
    return n


class StopStrings:
    """The stop strings of a sampling run, checked after each step on the rows that may have
    completed one."""

    def __init__(self, tokenizer, stop_strings, vocab_size, device):
        if stop_strings and tokenizer is None:
            raise ValueError("stop strings need the tokenizer to read the text")
        self.tokenizer, self.strings = tokenizer, tuple(stop_strings)
        if self.strings:
            self.finishers = stop_finishers(tokenizer, self.strings, vocab_size, device)
            # tokens enough to hold any stop string: each is at least one byte; the window may start
            # mid-character
            self.window = max(len(s.encode("utf-8")) for s in self.strings) + 4

    def cut(self, out, t, y, done, length):
        """After step t (tokens out (B, n_new), the new ones y (B,)): every row whose text now holds
        a stop string is marked done, its length cut before the string."""
        if not self.strings:
            return
        for i in (~done & torch.isin(y, self.finishers)).nonzero().flatten().tolist():
            newest = self.tokenizer.decode(out[i, max(0, t + 1 - self.window):t + 1].tolist())
            if any(s in newest for s in self.strings):
                n = cut_at_stop(out[i, :t + 1].tolist(), self.tokenizer, self.strings)
                if n is not None:
                    length[i], done[i] = n, True
