"""
The command line the scripts share: the flags that name a task, a way of sampling and a control; their checks
before any work; one-line errors and exit codes. Each group of flags fills a dataclass of the file that uses it
(generate.SamplingConfig, control.ControlConfig, train_value.TrainingConfig ...), whose own checks say what is wrong
with a value; the scripts build those from the flags, the tests build them directly.

Exit codes: 0 done; 1 the run could not produce its output (nothing written); 2 a bad flag (nothing done);
130 interrupted with Ctrl-C.
"""

import argparse
import math
import os
import sys
import typing
from dataclasses import fields


def add_config_arguments(parser, config, helps, flags=None):
    """One flag per field of the dataclass instance `config`, its default the field's: --field-name, or the name
    flags[field] gives (None: no flag). helps[field] says what it does. config_from_args builds the dataclass back."""
    for f in fields(config):
        flag = (flags or {}).get(f.name, f.name.replace("_", "-"))
        if flag is None:
            continue
        default = getattr(config, f.name)
        kind = next((t for t in typing.get_args(f.type) if t is not type(None)), f.type)  # float | None -> float
        if kind is bool:  # --flag and --no-flag
            parser.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=default,
                                help=helps[f.name])
        elif kind is tuple:  # any number of values
            parser.add_argument(f"--{flag}", nargs="*", default=default, help=helps[f.name])
        else:
            parser.add_argument(f"--{flag}", type=kind, default=default, help=helps[f.name])


def config_from_args(cls, args, flags=None):
    """The dataclass `cls` from the flags add_config_arguments made for it."""
    names = {f.name: (flags or {}).get(f.name, f.name.replace("_", "-")) for f in fields(cls)}
    return cls(**{name: getattr(args, flag.replace("-", "_")) for name, flag in names.items() if flag is not None})


def require(*rules):
    """Raise one ValueError that names every failed rule, each an (ok, message) pair; NaN fails every comparison."""
    problems = [message for ok, message in rules if not ok]
    if problems:
        raise ValueError("; ".join(problems))


def is_whole(x, least):
    return isinstance(x, (int, float)) and x == x and int(x) == x and x >= least


def is_finite(x, least, strictly=False):
    return isinstance(x, (int, float)) and math.isfinite(x) and (x > least if strictly else x >= least)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with the script's docstring as it is written, and each flag's default after its help."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, (), [], argparse.SUPPRESS) \
                and "default" not in text:
            text += " (default: %(default)s)"
        return text


def new_parser(doc):
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)


def check_not_an_input(out, inputs, flag="--out"):
    """An output path must not be one of the run's inputs ({what: path or [paths]}): it would be overwritten."""
    for what, paths in inputs.items():
        for path in [paths] if isinstance(paths, str) else paths or []:
            if os.path.exists(path) and os.path.realpath(path) == os.path.realpath(out):
                raise ValueError(f"{flag} {out} is also the {what}; write the output to another file")


def checked(parser, build):
    """The settings build() makes from the flags, checked before any work: a ValueError there is a bad flag,
    reported as a usage error (exit code 2)."""
    try:
        return build()
    except ValueError as e:
        parser.error(str(e))


def script_parser(doc, prompts, sampling):
    """The parser of a script that samples a model on a task: its docstring as the description, the task's flags
    (`prompts`: the default prompt set) and the sampling flags with the SamplingConfig `sampling` as defaults."""
    parser = new_parser(doc)
    add_task_arguments(parser, prompts)
    add_sampling_arguments(parser, sampling)
    return parser


def add_task_arguments(parser, prompts="toy-test"):
    """What model, which prompts, which reward (tasks.py reads them)."""
    parser.add_argument("--model", default="toy",
                        help="toy (the embedded default), toy-long, toy@SEED, or a model folder / hub name")
    parser.add_argument("--prompts", default=prompts, help=f"{prompts}, or a .txt / .jsonl / HH-RLHF .jsonl.gz file")
    parser.add_argument("--reward", default="toy",
                        help="toy, sentiment, rm:<folder> (rm:<folder>::ultrarm: UltraRM's text layout), "
                             "or module:function")
    parser.add_argument("--chat", default=None,
                        help="put each prompt in an instruct model's chat template: llama3 or vicuna")
    add_device_arguments(parser)


def add_device_arguments(parser):
    """Where the model runs and in which dtype (tasks.check_task_flags checks them)."""
    parser.add_argument("--dtype", default=None, help="model dtype: float32, bfloat16 or float16 (default: as stored)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, ... (default: cpu; under torchrun with cuda, each process takes the GPU of "
                             "its LOCAL_RANK)")


SAMPLING_HELP = {"max_new_tokens": "longest response (default: what the context leaves after the longest prompt, "
                                   "<= 128)",
                 "temperature": "sampling temperature (0: greedy)", "top_k": "keep the k most likely tokens",
                 "top_p": "keep the nucleus of probability p",
                 "stop": "stop strings that end a response (e.g. 'Human:')",
                 "samples_per_prompt": "responses per prompt", "batch_size": "responses sampled together"}
SAMPLING_FLAGS = {"eos_ids": None}  # named with --eos, as tokens; made ids once the tokenizer is loaded


def add_sampling_arguments(parser, config):
    """The fields of generate.SamplingConfig, with `config`'s values as defaults; --eos names its end tokens."""
    add_config_arguments(parser, config, SAMPLING_HELP, SAMPLING_FLAGS)
    parser.add_argument("--eos", nargs="+", default=None,
                        help="tokens that end a response, by text ('</s>', '<s>' for TinyStories) or id (default: the "
                             "checkpoint's end-of-sequence tokens, else the tokenizer's)")


def add_control_arguments(parser):
    """The settings of E7 (control.ControlConfig); each defaults to the one calibrated and stored with V."""
    parser.add_argument("--step-size", type=float, default=None,
                        help="alpha of E7 (default: the one train_value.py calibrated and stored with V, else 0.5)")
    parser.add_argument("--n-steps", type=int, default=None,
                        help="gradient steps n of E7 per token (default: as calibrated with V, else 30)")
    parser.add_argument("--target", default="auto",
                        help="stop the ascent once V reaches this value: a number, 'none', or 'auto' (stored with V)")
    parser.add_argument("--l2", type=float, default=0.0, help="lambda of E4/E7, the penalty on ||u||^2")
    parser.add_argument("--radius", type=float, default=None,
                        help="keep ||u|| <= radius * ||o_t|| (default: as calibrated with V; inf: no limit)")


def run_cli(main, interrupted="interrupted; nothing was written"):
    """Run a script's main(); a problem with its input ends with one line that names it, not a traceback
    (exit code 1), and Ctrl-C with the line `interrupted` (exit code 130)."""
    try:
        main()
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
    except KeyError as e:  # ours carry a sentence; str() would quote it
        sys.exit(f"error: {e.args[0] if e.args else e}")
    except (ValueError, OSError, ImportError) as e:
        sys.exit(f"error: {e}")
