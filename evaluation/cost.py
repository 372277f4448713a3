"""
What a method costs (E8's inference time, in a unit that does not move with the machine):
forward-pass FLOPs per response, counted from the configs of the models it runs.

A weight matrix of shape (m, n) read once costs 2 m n FLOPs (a multiply and an add per weight);
attention over c positions costs, in each layer and head, 2 c head_dim for q . k and as much for the
weighted sum of the values. Norms, activations, softmax and sampling are left out (they are a few
percent at these shapes). Per response:
- sampling: the prefill over the prompt's P tokens, then one forward pass per further token, and
  one read of the head per decision (the LM's logits);
- a reward-model call: a forward pass over prompt + response, and its scalar head once;
- RE-Control: n ascent steps of V per decision, each V forward and its gradient (twice V's
  matrices);
- controlled decoding (CD): k look-ahead passes of one token through the LM per decision, and V on
  each.
"""


def matrix_params(config):
    """Weights in the matrices a forward pass reads per token, the head left out: attention and MLP
    of every layer."""
    q, kv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    mlp = config.n_embd * config.intermediate_size * (3 if config.mlp == "swiglu" else 2)
    return config.n_layer * (config.n_embd * (q + 2 * kv) + q * config.n_embd + mlp)


def head_flops(config):
    """One read of the head: W o, (vocab, d), or a reward model's score head, (n_labels, d)."""
    return 2 * config.n_embd * (config.n_labels or config.vocab_size)


def token_flops(config, context):
    """The blocks' forward pass over one token that attends to `context` positions (itself
    included)."""
    attention = 4 * config.n_layer * config.n_head * config.head_dim * context
    return 2 * matrix_params(config) + attention


def sequence_flops(config, length, start=0):
    """A forward pass over `length` new tokens after `start` cached ones, and one read of the head.
    """
    return sum(token_flops(config, start + i) for i in range(1, length + 1)) + head_flops(config)


def sampling_flops(config, prompt_tokens, decisions):
    """Sampling one response: the prefill (its head gives the first decision), then a forward pass
    and a head for each further decision."""
    return sequence_flops(config, prompt_tokens) + sum(
        token_flops(config, prompt_tokens + t) + head_flops(config) for t in range(1, decisions))


def value_flops(value_config):
    """One forward pass of V (E5): its Linear layers, d -> width -> ... -> 1."""
    widths = [value_config.n_embd] + [value_config.width] * value_config.n_hidden + [1]
    return sum(2 * a * b for a, b in zip(widths, widths[1:]))


def ascent_flops(value_config, n_steps):
    """n steps of E7: V forward and its gradient back through the same matrices
    (value_and_gradient)."""
    return n_steps * 2 * value_flops(value_config)


def decisions_of(row, max_new_tokens):
    """How many tokens a response drew: its tokens, and the end-of-sequence token when it ended on
    one."""
    return min(len(row["tokens"]) + bool(row["finished"]), max_new_tokens)
