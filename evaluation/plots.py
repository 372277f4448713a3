"""
The plots of compare.py (matplotlib, optional): reward against fluency as E7's strength grows, with
every other method as a square; V(o_t) along the generated responses; and the training curves of V
(E6).
"""

import os


def value_along_tokens(rows, length):
    """Mean V(o_t) at each step t over the responses that reach it (rows of sample_responses with a
    value)."""
    means = []
    for t in range(length):
        reached = [r["values"][t] for r in rows if len(r["values"]) > t]
        if not reached:
            break
        means.append(sum(reached) / len(reached))
    return means


def plot_all(out_dir, sweep, summaries, along, history, fluency_key):
    """The three PNG plots; none (with a note) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    paths = []

    def save(fig, ax, name, title, xlabel, ylabel):
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        # beside the plot: it hides no point
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        paths.append(os.path.join(out_dir, name))
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    draw_reward_vs_fluency(ax, sweep, summaries, fluency_key, plt.get_cmap("tab10").colors)
    fluency = "grammatical fraction" if fluency_key == "grammatical" else \
        "perplexity under the base model"
    save(fig, ax, "reward_vs_fluency.png",
         "Reward against fluency: the alpha sweep of E7, other methods as squares", fluency,
         "mean reward")
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in along.items():
        ax.plot(range(len(curve)), curve, "o-", ms=3, label=name)
    save(fig, ax, "value_along_tokens.png",
         "V(o_t) along generated responses (mean over those that reach step t)",
         "step t of the response", "mean V(o_t)")
    if history:
        fig, ax = plt.subplots(figsize=(7, 4))
        draw_value_training(ax, history)
        save(fig, ax, "value_training.png", "Value training (E6)", "epoch", "mean squared error")
    return paths


def draw_reward_vs_fluency(ax, sweep, summaries, fluency_key, colors):
    """The sweeps in black and grey, each alpha written at its point (one sweep to the left, the
    other to the right, above and below in turn, so they do not collide); each other method a square
    of its own colour, in the legend."""
    sides = [("black", "o", -6, "right"), ("gray", "^", 6, "left")]  # the labels on opposite sides
    for bound, (color, marker, dx, align) in zip(dict.fromkeys(s["bound"] for s in sweep), sides):
        points = sorted((s for s in sweep if s["bound"] == bound), key=lambda s: s["alpha"])
        ax.plot([s[fluency_key] for s in points], [s["reward"] for s in points], marker=marker,
                color=color, label=f"RE-Control, {bound} (alpha grows)")
        near = {}  # points that (nearly) coincide share one label, "α=4, 8"
        for s in points:
            near.setdefault((round(s[fluency_key], 2), round(s["reward"], 2)), []).append(s)
        for i, group in enumerate(near.values()):
            label = "α=" + ", ".join(f"{s['alpha']:g}" for s in group)
            ax.annotate(label, (group[0][fluency_key], group[0]["reward"]),
                        textcoords="offset points", xytext=(dx, 4 if i % 2 else -9), ha=align,
                        fontsize=7, color=color)
    for s, color in zip(summaries, colors):
        ax.scatter(s[fluency_key], s["reward"], marker="s", s=60, zorder=3, color=color,
                   label=s["method"])


def draw_value_training(ax, history):
    """Per epoch: the method's own losses, V's held-out error against the return (which chooses the
    epoch kept, dashed) and the best constant's (dotted)."""
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], label="training loss (the method's own)")
    ax.plot(epochs, [h["held_out_loss"] for h in history], label="held-out loss (the method's own)")
    ax.plot(epochs, [h["error"] for h in history],
            label="held-out error of V(o_t) against the return")
    ax.axhline(history[0]["best_constant"], color="gray", ls=":",
               label="error of the best constant")
    kept = [h for h in history if h["kept"]][-1]
    ax.axvline(kept["epoch"], color="black", ls="--", lw=0.8, label=f"kept: epoch {kept['epoch']}")


def plot_win_against_cost(out_dir, summaries, sweep):
    """Two PNG plots for a world with a judge: win rate against FLOPs per response for every method
    (the seeds' spread as bars: the paper's performance against inference time), and the reward
    model's score beside the judge's win rate as E7's strength grows (where the proxy and the judge
    part)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, ax = plt.subplots(figsize=(7, 5))
    for s, color in zip(summaries, plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors):
        ax.errorbar(s["flops_per_response"], s["win_rate"], yerr=s["win_rate_sd_seeds"], fmt="s",
                    color=color, capsize=3, label=s["method"])
    ax.set(xscale="log", title="Win rate against the base model (judge) against cost",
           xlabel="forward-pass FLOPs per response", ylabel="win rate (ties count half)")
    ax.axhline(0.5, color="gray", ls=":", lw=0.8)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    paths = [os.path.join(out_dir, "win_rate_vs_flops.png")]
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for bound, style in zip(dict.fromkeys(s["bound"] for s in sweep), ("-", "--")):
        points = sorted((s for s in sweep if s["bound"] == bound), key=lambda s: s["alpha"])
        alphas = [s["alpha"] for s in points]
        ax.plot(alphas, [s["reward"] for s in points], "o" + style, color="black",
                label=f"reward model, {bound}")
        ax.plot(alphas, [2 * s["win_rate"] - 1 for s in points], "^" + style, color="tab:red",
                label=f"judge: 2 x win rate - 1, {bound}")
    ax.set(xscale="symlog",
           title="Over-optimisation: the proxy and the judge as E7's strength grows",
           xlabel="alpha (n fixed)", ylabel="score")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    paths.append(os.path.join(out_dir, "proxy_vs_judge.png"))
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths
