"""
Which Bellman value steers? The E6 family side by side on one set of rollouts: TD(0) (the paper),
TD(lambda) for a few lambda, the official code's loss as written, and Monte Carlo (lambda = 1). For
each: how V fits the held-out returns (its spread over states, its error against the realised return
by position, against the best constant), then RE-Control with the step size each V calibrates for
itself (train_value.py's defaults), on the test prompts.

    python benchmarks/bellman_methods.py --model toy    # responses of ~15 tokens, ~10 min, 2 cores
    # ~100 tokens, ~25 min:
    python benchmarks/bellman_methods.py --model toy-long --epochs 30 --samples-per-prompt 24
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_value  # noqa: E402
from recontrol import learn_and_steer  # noqa: E402
from worlds import load_model  # noqa: E402

METHODS = {"TD(0)": dict(lam=0.0), "TD(0.5)": dict(lam=0.5), "TD(0.9)": dict(lam=0.9),
           "official": dict(method="official"),
           "MC (lambda = 1)": dict(lam=1.0), "TD(0), no sg": dict(lam=0.0, stop_gradient=False),
           # train_value.TrainingConfig fields
           "TD(0.9), no sg": dict(lam=0.9, stop_gradient=False)}
DEFAULT_METHODS = ["TD(0)", "TD(0.5)", "TD(0.9)", "official", "MC (lambda = 1)"]


def run_method(name, args, model, enc, out_dir):
    folder = name.replace(" (lambda = 1)", "").replace(", no sg", "-nosg")
    folder = folder.replace("(", "").replace(")", "").lower()
    training = train_value.TrainingConfig(epochs=args.epochs, **METHODS[name])
    _, control, history, (base, ctrl), _ = learn_and_steer(
        model, enc, args.model, os.path.join(out_dir, folder), training,
                                                           rollouts=os.path.join(out_dir,
                                                                                 "rollouts"),
        rollouts_per_prompt=args.samples_per_prompt, seeds=args.seeds)
    kept = train_value.kept_epoch(history)
    return {"method": name, "epoch": kept["epoch"], "spread": kept["spread"], "corr": kept["corr"],
            "error": kept["error"], "best_constant": kept["best_constant"],
            "by_position": kept["error_by_position"],
            "radius": control.radius, "base": base, "ctrl": ctrl}


def table(rows):
    positions = list(rows[0]["by_position"])
    lines = ["| method | kept epoch | spread of V | corr(V, return) | error (best constant) | "
             f"error by position {' / '.join(positions)} | radius | reward base → RE-Control | "
             "gain / seed sd | KL/token | perplexity (base) | grammatical (base) |",
             "|" + "---|" * 12]
    for r in rows:
        b, c = r["base"], r["ctrl"]
        by_position = " / ".join(f"{r['by_position'][p]:.3f}" for p in positions)
        spread = max(b["reward_sd_seeds"], c["reward_sd_seeds"])
        gain = f"{(c['reward'] - b['reward']) / spread:+.1f}" if spread > 0 else "n/a (one seed)"
        grammar = f"{c['grammatical']:.1%} ({b['grammatical']:.1%})" \
            if b["grammatical"] == b["grammatical"] else "-"
        lines.append(f"| {r['method']} | {r['epoch']} | {r['spread']:.3f} | {r['corr']:+.3f} | "
                     f"{r['error']:.3f} ({r['best_constant']:.3f}) | {by_position} | "
                     f"{r['radius']} | {b['reward']:+.3f} → {c['reward']:+.3f} | "
                     f"{gain} | {c['kl']:.3f} | {c['perplexity']:.2f} "
                     f"({b['perplexity']:.2f}) | {grammar} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy", help="toy, toy-long, or either @SEED")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                        help=f"any of: {', '.join(METHODS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="sampling seeds of the test runs")
    parser.add_argument("--out-dir", default=None, help="default: out/bellman/<model>")
    parser.add_argument("--epochs", type=int, default=100,
                        help="value training epochs (train_value.py's default)")
    parser.add_argument("--samples-per-prompt", type=int, default=48,
                        help="rollouts per training prompt (default too)")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or os.path.join("out", "bellman", args.model)
    model, enc = load_model(args.model)
    rows = [run_method(name, args, model, enc, out_dir) for name in args.methods]
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"\n{args.model}: every method on the same rollouts; RE-Control at each V's own "
          f"calibrated step size, test prompts, seeds {args.seeds}\n" + table(rows))


if __name__ == "__main__":
    main()
