"""Markdown helpers shared by the benchmark pages: tables, verdicts, machine."""

import os
import platform

import keras
import keras_hub
import tensorflow as tf

import keras_adapters


def check_output_folders(parser, **paths):
    """Stop with a usage error if an output path cannot be a new file.

    Each keyword names an option, such as `page`, and gives its path or
    `None`. Checking before a run spares a long run that could not write
    its results at the end.
    """
    for option, path in paths.items():
        if path is None:
            continue
        flag = "--" + option.replace("_", "-")
        if os.path.isdir(path):
            parser.error(f"{flag} must be a file path, not a folder: {path}")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            parser.error(f"the folder of {flag} does not exist: {folder}")


def describe_machine():
    """Return this machine's CPU, GPUs, platform and package versions as a dict."""
    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpus = tf.config.list_physical_devices("GPU")
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "gpus": len(gpus),
        "gpu_names": [gpu_name(gpu) for gpu in gpus],
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_hub": keras_hub.__version__,
        "keras_adapters": keras_adapters.__version__,
        "platform": platform.platform(),
        "onednn": onednn_enabled(),
    }


def onednn_enabled():
    """Return whether TensorFlow's oneDNN kernels are on, or `None` if unknown.

    On Linux, TensorFlow turns them on by default only on x86 CPUs with
    AVX-512 VNNI, AVX-512 BF16, AVX-VNNI or AMX. The environment variable
    `TF_ENABLE_ONEDNN_OPTS`, read when TensorFlow loads, overrides that.
    """
    try:
        # NOTE: `_pywrap_util_port` is not public TensorFlow API. TensorFlow
        # 2.21 has it, and its `IsMklEnabled` applies the rule above.
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


def describe_onednn(enabled):
    """Return `"oneDNN on"`, `"oneDNN off"` or `"oneDNN unknown"`.

    `enabled` is what `onednn_enabled` returned.
    """
    if enabled is None:
        return "oneDNN unknown"
    return "oneDNN on" if enabled else "oneDNN off"


def gpu_name(device):
    """Return a GPU's model name, or its TensorFlow device name if unknown."""
    details = tf.config.experimental.get_device_details(device)
    return details.get("device_name", device.name)


def describe_device(machine):
    """Describe the device the timed models ran on, for a page's machine line."""
    if machine["gpus"]:
        return "timed on GPU ({})".format(", ".join(machine["gpu_names"]))
    return "timed on the CPU, no GPU visible to TensorFlow"


def gpu_note(machine):
    """State whether this run measured GPU ratios, as a Markdown paragraph."""
    if not machine["gpus"]:
        return (
            "GPU ratios were not measured, because TensorFlow found no GPU on "
            'this machine (`tf.config.list_physical_devices("GPU")` returned '
            "an empty list). Every time on this page is a CPU time."
        )
    return (
        "The ratios on this page are GPU ratios, because TensorFlow placed "
        "the models on {}. CPU ratios were not measured in this run. To "
        "measure them on this machine, hide the GPUs with "
        "`CUDA_VISIBLE_DEVICES=` and run the command again.".format(
            ", ".join(machine["gpu_names"])
        )
    )


def compare_to_target(ratio, target):
    """Describe whether `ratio` meets the upper bound `target`."""
    if ratio <= target:
        return f"met ({ratio:.3f} ≤ {target:.2f})"
    excess = ratio - target
    return f"missed by {excess:.3f} ({100 * excess / target:.1f}% over {target:.2f})"


def compare_accuracy(difference_points, allowed_points):
    """Describe whether an accuracy difference, in points, is within the allowance.

    `difference_points` is the method's accuracy less the reference's, in
    percentage points, so a negative value is a loss.
    """
    if difference_points >= -allowed_points:
        return f"met ({difference_points:+.2f} ≥ −{allowed_points:.2f} points)"
    shortfall = -allowed_points - difference_points
    return f"missed by {shortfall:.2f} points ({difference_points:+.2f} < −{allowed_points:.2f})"


def format_ratio(summary, prefix=""):
    """Format a median ratio and its range, read from keys that start with `prefix`."""
    return (
        f"{summary[prefix + 'ratio_median']:.3f} "
        f"({summary[prefix + 'ratio_min']:.3f}–{summary[prefix + 'ratio_max']:.3f})"
    )


def format_table(header, rows):
    """Format rows as a Markdown table."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def format_load(load):
    return ", ".join(f"{value:.2f}" for value in load)


def write_generated_block(path, block, begin, end, title):
    """Write `block` between the markers `begin` and `end` of the page at `path`.

    Text before `begin` and after `end` in an existing page, such as
    findings written by hand, is kept. A page without both markers is
    replaced by `title` and the block.
    """
    block = "\n\n".join([begin, block, end])
    text = ""
    if os.path.exists(path):
        with open(path) as file:
            text = file.read()
    if begin in text and end in text:
        before = text.split(begin, 1)[0]
        after = text.split(end, 1)[1]
        text = before + block + after
    else:
        text = title + "\n\n" + block + "\n"
    with open(path, "w") as file:
        file.write(text)
