"""
The plumbing under the method: nothing here is in the paper, everything here is needed to run it on
real files.

- checkpoints.py: models and value functions on disk (from_pretrained, save_pretrained,
  save_value, load_value);
- formats.py: other codebases' checkpoint layouts mapped onto model.py's names;
- tokenizer.py, stop_strings.py: text <-> tokens, built offline, and where a stop string ends a
  response;
- prompts.py, rewards.py: prompt files and reward functions (lexicon, reward models, plug-ins);
- files.py: atomic writes and the provenance record that keeps one job from overwriting another's
  files;
- cli.py: the flags the scripts share, one-line errors and exit codes;
- parallel.py: torchrun data parallelism.
Imports flow down only: torch, the standard library, model.py, and each other.
"""
