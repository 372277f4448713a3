"""
The paper's evaluation (docs/method.md, E8), each metric a function of its own.

- mean reward, and its spread over seeds;
- diversity: prod_{n=2..4} (1 - rep_n), rep_n = 1 - unique n-grams / n-grams of a response;
- coherence: cosine similarity of sentence embeddings of prompt and response. The paper uses
  SimCSE, which cannot be downloaded here; the embedding is the mean of the *base model's own*
  states o_t over the tokens of a text, read alone. Said so wherever it is printed;
- perplexity of the responses under the base model;
- mean per-token KL from the base model's next-token distribution (recorded by generate.sample);
- in the toy world, the exact grammatical fraction (worlds/toy.py, is_grammatical);
- the fraction of responses cut at max_new_tokens before they ended;
- wall time per response and tokens per second.
"""

import math
import statistics

import torch
import torch.nn.functional as F

from model import left_pad

COHERENCE_NOTE = ("coherence: cosine of mean-pooled base-model states of prompt and response "
                  "(SimCSE is not available offline)")


def mean_and_spread(values):
    """Mean and standard deviation (0 for a single value) of per-seed results."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def diversity(responses):
    """E8: mean over responses (lists of token ids) of prod_{n=2..4} (1 - rep_n); n-grams a response
    is too short to have do not count against it."""
    # >>> exercise E8: per response, the product over n = 2, 3, 4 of unique / all n-grams; the mean
    scores = []
    for tokens in responses:
        score = 1.0
        for n in (2, 3, 4):
            grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
            if grams:
                score *= len(set(grams)) / len(grams)
        scores.append(score)
    return statistics.fmean(scores) if scores else float("nan")
    # <<< exercise E8


@torch.no_grad()
def sentence_embeddings(model, texts_ids, batch_size=64):
    """(N, C): the mean of the model's states o_t over the tokens of each text, read on its own."""
    out = []
    device = model.wte.weight.device
    for b in range(0, len(texts_ids), batch_size):
        idx, mask = left_pad(texts_ids[b:b + batch_size], device)
        o = model.states(idx, attention_mask=mask).float()  # (B, T, C)
        m = mask[..., None].float()
        out.append((o * m).sum(1) / m.sum(1))
    return torch.cat(out)


def coherence(model, prompts_ids, responses_ids):
    """Mean cosine similarity between the embeddings of each prompt and its response (empty
    responses skipped)."""
    pairs = [(p, r) for p, r in zip(prompts_ids, responses_ids) if r]
    if not pairs:
        return float("nan")
    prompts, responses = zip(*pairs)
    cos = F.cosine_similarity(sentence_embeddings(model, list(prompts)),
                              sentence_embeddings(model, list(responses)))
    return cos.mean().item()


@torch.no_grad()
def perplexity(model, prompts_ids, responses_ids, batch_size=64):
    """exp of the mean negative log-likelihood, per response token, of the responses given their
    prompts."""
    total_nll, total_tokens = 0.0, 0
    device = model.wte.weight.device
    rows = [(p, r) for p, r in zip(prompts_ids, responses_ids) if r]
    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        idx, mask = left_pad([p + r for p, r in chunk], device)
        # (B, T, vocab)
        logp = model.head(model.states(idx, attention_mask=mask)).float().log_softmax(-1)
        T = idx.shape[1]
        for i, (_, r) in enumerate(chunk):
            # response token j sits at position T - len(r) + j and is predicted from the position
            # before it
            positions = torch.arange(T - len(r) - 1, T - 1, device=device)
            total_nll -= logp[i, positions, idx[i, positions + 1]].sum().item()
            total_tokens += len(r)
    return math.exp(total_nll / total_tokens) if total_tokens else float("nan")


def grammatical_fraction(responses, is_grammatical):
    if not responses:
        return float("nan")
    return statistics.fmean(bool(is_grammatical(r)) for r in responses)


def throughput(n_tokens, n_responses, seconds):
    """(milliseconds per response, tokens per second) of a timed run."""
    return 1000 * seconds / max(n_responses, 1), n_tokens / seconds if seconds else float("nan")
