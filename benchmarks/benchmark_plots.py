"""Plots of the adapter benchmark's results, written as PNG files.

Needs matplotlib, from the `benchmarks` extra
(`pip install -c tools/constraints.txt -e .[benchmarks]`).
"""

ACCURACY_PLOT = "accuracy_vs_parameters.png"
STEP_TIME_PLOT = "step_time.png"


def check_matplotlib():
    """Raise `SystemExit` with the install command when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError as error:
        raise SystemExit(
            "The plots need matplotlib, which is not installed. Install it "
            "with `pip install -c tools/constraints.txt -e .[benchmarks]`, "
            "or pass --no-plots."
        ) from error


def _pyplot():
    import matplotlib

    # Draw to files only, so that no display is needed.
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def plot_accuracy_vs_parameters(path, points, reference, title):
    """Plot held-out accuracy against trainable parameters, with a log x axis.

    Args:
        path: string. The PNG file to write.
        points: list of dicts with `label`, `trainable`, `accuracy` and
            `interval` (the half-width of the 95% interval).
        reference: string or `None`. Label of the point whose accuracy is
            also drawn as a dashed horizontal line, such as full fine-tuning.
        title: string.
    """
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    markers = "osD^vP*X"
    for index, point in enumerate(points):
        axes.errorbar(
            point["trainable"],
            point["accuracy"],
            yerr=point["interval"],
            fmt=markers[index % len(markers)],
            capsize=3,
            label=point["label"],
        )
        if point["label"] == reference:
            axes.axhline(
                point["accuracy"],
                color="grey",
                linestyle="--",
                linewidth=1,
                label=f"{reference}, accuracy",
            )
    axes.set_xscale("log")
    axes.set_xlabel("trainable parameters (log scale)")
    axes.set_ylabel("held-out accuracy (bars: 95% interval)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def plot_step_time(path, series, targets, title):
    """Plot each method's training step time as a ratio to full fine-tuning.

    Args:
        path: string. The PNG file to write.
        series: dict mapping a series label, such as `"XLA off"`, to a list
            of dicts with `label`, `median`, `min` and `max` ratios. Every
            series lists the same methods in the same order.
        targets: dict mapping a target's label to its ratio, drawn as
            vertical lines.
        title: string.
    """
    pyplot = _pyplot()
    labels = [entry["label"] for entry in next(iter(series.values()))]
    figure, axes = pyplot.subplots(figsize=(7, 1.8 + 0.45 * len(labels) * len(series)))
    height = 0.8 / len(series)
    for index, (series_label, entries) in enumerate(series.items()):
        positions = [row + index * height for row in range(len(labels))]
        medians = [entry["median"] for entry in entries]
        errors = [
            [entry["median"] - entry["min"] for entry in entries],
            [entry["max"] - entry["median"] for entry in entries],
        ]
        axes.barh(
            positions,
            medians,
            height=height,
            xerr=errors,
            capsize=3,
            label=series_label,
        )
    line_styles = ["--", ":", "-."]
    for index, (target_label, ratio) in enumerate(targets.items()):
        axes.axvline(
            ratio,
            color="black",
            linestyle=line_styles[index % len(line_styles)],
            linewidth=1,
            label=target_label,
        )
    axes.set_yticks(
        [row + height * (len(series) - 1) / 2 for row in range(len(labels))]
    )
    axes.set_yticklabels(labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("training step time / full fine-tuning")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
