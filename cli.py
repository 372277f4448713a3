"""
The command line the scripts share: the flags that name a task, a way of sampling and a control, and one-line
errors. Each group of flags fills a dataclass of the file that uses it (generate.SamplingConfig,
control.ControlConfig); the scripts build those from the flags, the tests build them directly.
"""

import sys


def add_task_arguments(parser, prompts="toy-test"):
    """What model, which prompts, which reward (tasks.py reads them)."""
    parser.add_argument("--model", default="toy",
                        help="toy (the embedded default), toy-long, toy@SEED, or a model folder / hub name")
    parser.add_argument("--prompts", default=prompts, help=f"{prompts}, or a .txt / .jsonl / HH-RLHF .jsonl.gz file")
    parser.add_argument("--reward", default="toy", help="toy, sentiment, rm:<folder>, or module:function")
    parser.add_argument("--dtype", default=None, help="model dtype: float32, bfloat16 or float16 (default: as stored)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")


def add_sampling_arguments(parser, samples_per_prompt=1):
    """The fields of generate.SamplingConfig."""
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="longest response (default: what the context leaves after the longest prompt, <= 128)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="keep the nucleus of probability p")
    parser.add_argument("--stop", nargs="*", default=(), help="stop strings that end a response (e.g. 'Human:')")
    parser.add_argument("--samples-per-prompt", type=int, default=samples_per_prompt, help="responses per prompt")
    parser.add_argument("--batch-size", type=int, default=64, help="responses sampled together")


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


def run_cli(main):
    """Run a script's main(); a mistake in its input ends with one line that names it, not a traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError, KeyError, ImportError) as e:
        sys.exit(f"error: {e if isinstance(e, OSError) or not e.args else e.args[0]}")
