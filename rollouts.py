"""
Rollouts (E1, E6): the base model's own responses to the training prompts, with the states o_0 ...
o_T it went through and the reward R of each, kept on disk for value training.

Shards of fp16 states are written atomically and a long collection resumes where it stopped (each
response has its own seed, so the data do not depend on where it stopped). Under torchrun each
process collects every N-th shard, and the folder holds the same shards as one process would write.
The folder records what made it (the model and a fingerprint of its weights, the tokenizer, a hash
of the prompts, the reward, the sampling settings and the seed): collecting into it with anything
different is an error unless the caller overwrites it.
"""

import glob
import json
import math
import os
import random
import time

import torch

from generate import row_seeds, sample
from plumbing import parallel
from plumbing.checkpoints import model_fingerprint
from plumbing.files import (check_zip, differences, read_json, remove_leftovers, write_atomically,
                            write_text_atomically)
from plumbing.prompts import prompts_digest


def rollout_job(model, enc, prompts, reward_name, model_id):
    """What rollouts are made from, recorded in their folder: the base model, its tokenizer, the
    prompts, the reward."""
    return {"model": model_id, "base_fingerprint": model_fingerprint(model), "tokenizer": enc.name,
            "prompts": prompts_digest(prompts), "reward": reward_name}


def collect_rollouts(model, enc, prompts, reward_fn, folder, config, seed=0, shard_size=512,
                     made_by=None, overwrite=False, log=print):
    """Sample config.samples_per_prompt responses per prompt with the base model, keep o_0 ... o_T
    (E1) and R.

    Shards of `shard_size` responses are written atomically to `folder`; an interrupted collection
    with the same settings resumes at the first missing shard (each response has its own seed,
    generate.row_seeds, so results do not depend on where it stopped). Under torchrun, process r
    writes shards r, r + N, ... and all of them wait until every shard is there. The folder records
    what made it (`made_by`: the model, the reward ..., and the sampling settings): collecting into
    it with anything different is an error, unless `overwrite` deletes its shards.
    """
    # 3: a seed per response
    settings = dict(shard_format=3, n_prompts=len(prompts), prompts_head=prompts[:3],
                    samples_per_prompt=config.samples_per_prompt,
                    max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                    top_k=config.top_k,
                    top_p=config.top_p, stop_strings=list(config.stop), seed=seed,
                    shard_size=shard_size, width=model.config.n_embd, **(made_by or {}))
    # recorded only when named, so folders made without --eos keep their settings
    if config.eos_ids is not None:
        settings["eos_ids"] = list(config.eos_ids)
    shard_paths = prepare_folder(folder, settings, overwrite)
    if parallel.is_main():
        remove_leftovers(folder, log)
    log(f"rollouts: {len(shard_paths)} shards already in {folder} are reused" if shard_paths else
        f"rollouts: collecting {config.samples_per_prompt} responses for each of {len(prompts)} "
        f"prompts into {folder}")
    # (prompt, sample)
    jobs = [(i, k) for i in range(len(prompts)) for k in range(config.samples_per_prompt)]
    n_shards = math.ceil(len(jobs) / shard_size)
    t0, done = time.time(), 0
    for s in parallel.my_share(n_shards):  # shard s: jobs s * shard_size ...
        path = os.path.join(folder, f"shard_{s:05d}.pt")
        if os.path.exists(path):
            continue
        shard_jobs = jobs[s * shard_size:(s + 1) * shard_size]
        shard = sample_shard(model, enc, prompts, reward_fn, shard_jobs, s * shard_size, config,
                             seed)
        meta_path = os.path.join(folder, "rollouts.json")
        # written with the first shard: a run that fails before leaves nothing
        if not os.path.exists(meta_path):
            # (by every process that gets here first: the same text, atomically)
            os.makedirs(folder, exist_ok=True)
            write_text_atomically(meta_path,
                                  json.dumps({"settings": settings, "n_shards": n_shards}))
        write_atomically(path, lambda p: torch.save(shard, p))
        done += len(shard_jobs)
        rate = done / (time.time() - t0)
        left = len(jobs) - (s + 1) * shard_size
        log(f"rollouts: shard {s + 1}/{n_shards}, {rate:.1f} responses/s, mean reward "
            f"{shard['rewards'].mean():+.3f}, ETA "
            f"{max(left, 0) / rate / parallel.world_size():.0f}s")
    parallel.barrier()  # training reads every process's shards
    return folder


def prepare_folder(folder, settings, overwrite):
    """The shards already in a rollout folder made with these settings (to reuse); none when
    `overwrite` empties it. A folder made with other settings is an error that says what differs."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--rollouts {folder} is a file; name a folder")
    meta_path = os.path.join(folder, "rollouts.json")
    shard_paths = sorted(glob.glob(os.path.join(folder, "shard_*.pt")))
    made_before = os.path.exists(meta_path)
    parallel.barrier()  # every process has looked at the folder before any process changes it
    if made_before and overwrite:
        if parallel.is_main():
            for path in shard_paths + [meta_path]:  # our own files only
                os.remove(path)
        parallel.barrier()  # emptied before any process writes again
        return []
    if made_before:
        changed = differences(read_json(meta_path)["settings"], settings)
        if changed:
            raise ValueError(f"{folder} holds rollouts made with other settings "
                             f"({'; '.join(changed[:4])}{'; ...' if len(changed) > 4 else ''}); "
                             "pass --overwrite to collect them again there, or name another "
                             "folder with --rollouts")
    return shard_paths


def sample_shard(model, enc, prompts, reward_fn, shard_jobs, first_job, config, seed):
    """One shard: the responses to the jobs (prompt index, sample), from the seeds of jobs first_job
    ..., with their states o_0 ... o_T in fp16, their rewards, tokens and texts."""
    states, lengths, texts, tokens, finished = [], [], [], [], []
    for b in range(0, len(shard_jobs), config.batch_size):
        batch = [prompts[i] for i, _ in shard_jobs[b:b + config.batch_size]]
        out = sample(model, [enc.encode(p, allowed_special="all") for p in batch], config,
                     tokenizer=enc,
                     seed=row_seeds(seed, first_job + b, len(batch)), record_states=True)
        states += [x.half().cpu() for x in out.states]
        lengths += [x.shape[0] for x in out.states]
        texts += out.texts
        tokens += out.tokens
        finished += out.finished
    prompt_index = [i for i, _ in shard_jobs]
    rewards = reward_fn([prompts[i] for i in prompt_index], texts).float()
    return {"states": torch.cat(states), "lengths": torch.tensor(lengths), "rewards": rewards,
            "prompt_index": torch.tensor(prompt_index), "texts": texts, "tokens": tokens,
            "finished": torch.tensor(finished)}


class Rollouts:
    """Streams the shards of a rollout folder as padded batches (states (B, L, d), mask (B, L),
    rewards (B,)); with drop_unfinished, without the responses that were cut at max_new_tokens
    before they ended."""

    def __init__(self, folder, drop_unfinished=False):
        meta_path = os.path.join(folder, "rollouts.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{folder} has no rollouts.json; collect rollouts first "
                                    "(train_value.py)")
        with open(meta_path) as f:
            meta = json.load(f)
        self.paths = [os.path.join(folder, f"shard_{s:05d}.pt") for s in range(meta["n_shards"])]
        missing = [p for p in self.paths if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} rollout shards are missing (e.g. "
                                    f"{missing[0]}); run the collection again to resume it")
        for path in self.paths:  # a truncated shard or a flipped bit, named before any training
            try:
                check_zip(path, "rollout shard")
            except ValueError as e:
                raise ValueError(f"{e}; delete it and rerun the same command: the collection "
                                 "makes it again") \
                    from None
        self.settings, self.drop_unfinished = meta["settings"], drop_unfinished

    def finished_fraction(self):
        """(responses that ended with EOS or a stop string, all responses)."""
        finished = torch.cat([torch.load(p, weights_only=True)["finished"] for p in self.paths])
        return int(finished.sum()), len(finished)

    def trajectories(self, prompt_ids, rng):
        """(states (T+1, d), reward) of the responses to the given prompts, shard by shard in random
        order."""
        for path in rng.sample(self.paths, len(self.paths)):
            shard = torch.load(path, weights_only=True)
            pieces = shard["states"].split(shard["lengths"].tolist())
            order = [j for j in range(len(pieces)) if int(shard["prompt_index"][j]) in prompt_ids
                     and (shard["finished"][j] or not self.drop_unfinished)]
            rng.shuffle(order)
            for j in order:
                yield pieces[j], shard["rewards"][j]

    def reward_quantile(self, prompt_ids, q):
        """The q-quantile of the rewards of the responses to the given prompts."""
        rewards = torch.cat([shard["rewards"][[int(i) in prompt_ids for i in shard["prompt_index"]]]
                             for shard in (torch.load(p, weights_only=True) for p in self.paths)])
        return torch.quantile(rewards, q).item()

    def batches(self, prompt_ids, batch_size, seed=0, device=None):
        rng = random.Random(seed)
        pool = []
        for item in self.trajectories(set(prompt_ids), rng):
            pool.append(item)
            if len(pool) == batch_size:
                yield pad_batch(pool, device)
                pool = []
        if pool:
            yield pad_batch(pool, device)


def pad_batch(items, device=None):
    """Right-pad trajectories of different lengths into (states (B, L, d) fp32, mask (B, L), rewards
    (B,)), on `device` (default: the CPU)."""
    L = max(s.shape[0] for s, _ in items)
    states = torch.zeros(len(items), L, items[0][0].shape[1])
    mask = torch.zeros(len(items), L, dtype=torch.bool)
    for i, (s, _) in enumerate(items):
        states[i, :s.shape[0]] = s.float()
        mask[i, :s.shape[0]] = True
    return states.to(device), mask.to(device), torch.stack([r for _, r in items]).float().to(device)
