"""
The command line the scripts share: the flags that name a task, a way of sampling and a control;
their checks before any work; one-line errors and exit codes. Each group of flags fills a dataclass
of the file that uses it (generate.SamplingConfig, control.ControlConfig, train_value.TrainingConfig
...): a flag's help is its field's documentation (field metadata "help"), and the dataclass's own
checks say what is wrong with a value in terms of its fields, which this layer names as flags. The
scripts build the dataclasses from flags, the tests directly.

Exit codes: 0 done; 1 the run could not produce its output (nothing written); 2 a bad flag (nothing
done); 130 interrupted with Ctrl-C, 143 stopped by SIGTERM.
"""

import argparse
import math
import signal
import sys
import typing
from dataclasses import field, fields


def setting(default, doc, flag=None):
    """A dataclass field whose documentation travels with it: --help reads it
    (add_config_arguments); `flag` names its flag when it is not --field-name."""
    return field(default=default, metadata={"help": doc, **({"flag": flag} if flag else {})})


def flag_of(f):
    """The flag of a dataclass field: --field-name, or the name its metadata "flag" gives (None: no
    flag)."""
    flag = f.metadata.get("flag", f.name.replace("_", "-"))
    return None if flag is None else f"--{flag}"


def add_config_arguments(parser, config):
    """One flag per documented field of `config` (flag_of), its help the field's own documentation,
    its default the field's: `config`'s value when it is an instance, the declared default when it
    is the dataclass itself. config_from_args builds the dataclass back."""
    for f in fields(config):
        if flag_of(f) is None or "help" not in f.metadata:
            continue
        default = getattr(config, f.name) if not isinstance(config, type) else f.default
        help_text = f.metadata["help"]
        # float | None -> float
        kind = next((t for t in typing.get_args(f.type) if t is not type(None)), f.type)
        if kind is bool:  # --flag and --no-flag
            parser.add_argument(flag_of(f), action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        elif kind is tuple:  # any number of values
            parser.add_argument(flag_of(f), nargs="*", default=default, help=help_text)
        else:
            parser.add_argument(flag_of(f), type=kind, default=default, help=help_text)


def config_from_args(cls, args, **given):
    """The dataclass `cls` from the flags add_config_arguments made for it (and the fields `given`
    here); its complaints name the flags."""
    values = {f.name: getattr(args, flag_of(f)[2:].replace("-", "_")) for f in fields(cls)
              if flag_of(f) is not None and "help" in f.metadata}
    return in_flags(cls, lambda: cls(**values, **given))


def in_flags(cls, build):
    """build(), with a ValueError about the fields of the dataclass `cls` told in terms of their
    flags: each problem ("; "-separated) that begins with a field's name begins with its flag
    instead."""
    try:
        return build()
    except ValueError as e:
        flags = {f.name: flag_of(f) for f in fields(cls) if flag_of(f) is not None}
        problems = []
        for problem in str(e).split("; "):
            name, _, rest = problem.partition(" ")
            problems.append(f"{flags[name]} {rest}" if name in flags else problem)
        raise ValueError("; ".join(problems)) from None


def require(*rules):
    """Raise one ValueError that names every failed rule, each an (ok, message) pair; NaN fails
    every comparison."""
    problems = [message for ok, message in rules if not ok]
    if problems:
        raise ValueError("; ".join(problems))


def is_whole(x, least):
    return isinstance(x, (int, float)) and x == x and int(x) == x and x >= least


def is_finite(x, least, strictly=False):
    return isinstance(x,
                      (int, float)) and math.isfinite(x) and (x > least if strictly else x >= least)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with the script's docstring as it is written, and each flag's default after its help.
    """

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, (), [],
                                                            argparse.SUPPRESS) \
                and "default" not in text:
            text += " (default: %(default)s)"
        return text


def new_parser(doc):
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)


def checked(parser, build):
    """The settings build() makes from the flags, checked before any work: a ValueError there is a
    bad flag, reported as a usage error (exit code 2)."""
    try:
        return build()
    except ValueError as e:
        parser.error(str(e))


def add_task_arguments(parser, prompts="toy-test"):
    """What model, which prompts, which reward (worlds/ reads them)."""
    parser.add_argument("--model", default="toy",
                        help="toy (the embedded default), toy-long, verdict, NAME@SEED, or a model "
                             "folder / hub name")
    parser.add_argument("--prompts", default=prompts,
                        help=f"{prompts} (or toy-train, verdict-train, verdict-test), or a .txt / "
                             ".jsonl / HH-RLHF .jsonl.gz file")
    parser.add_argument("--reward", default="toy",
                        help="toy, verdict-rm[@SEED] (a learned reward model), sentiment, "
                             "rm:<folder> (rm:<folder>::ultrarm: UltraRM's text layout), or "
                             "module:function")
    parser.add_argument("--chat", default=None,
                        help="put each prompt in an instruct model's chat template: llama3 or "
                             "vicuna")
    parser.add_argument("--tokenizer", default=None,
                        help="the model's tokenizer: a folder, or a llama2.c .bin file such as "
                             "tok512.bin (default: the one beside the weights)")
    add_device_arguments(parser)


def add_device_arguments(parser):
    """Where the model runs and in which dtype (checkpoints.check_dtype_and_device checks them)."""
    parser.add_argument("--dtype", default=None,
                        help="model dtype: float32, bfloat16 or float16 (default: as stored)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, ... (default: cpu; under torchrun with cuda, each "
                             "process takes the GPU of its LOCAL_RANK)")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `timeout`, a container stopping): unwinds like Ctrl-C, so every
    `finally` runs."""


def on_sigterm(signum, frame):
    raise Terminated


def run_cli(main, interrupted="interrupted; nothing was written"):
    """Run a script's main(); a problem with its input ends with one line that names it, not a
    traceback (exit code 1), and Ctrl-C or SIGTERM with the line `interrupted` (exit codes 130 and
    143), after the same cleanup (temporary files removed, locks released)."""
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        main()
    except KeyboardInterrupt as e:
        print(interrupted, file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    except KeyError as e:  # ours carry a sentence; str() would quote it
        sys.exit(f"error: {e.args[0] if e.args else e}")
    except (ValueError, OSError, ImportError) as e:
        sys.exit(f"error: {e}")
    finally:
        signal.signal(signal.SIGTERM, previous)
