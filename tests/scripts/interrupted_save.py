"""Save adapters once, then start a second save that stalls mid-write.

The test that runs this script kills it with SIGKILL during the second save.
It prints "saved" after the first save and "writing" once the second save
has written part of its data, then waits to be killed.
"""

import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import safetensors.numpy  # noqa: E402
from conftest import fit_briefly  # noqa: E402
from conftest import make_classifier  # noqa: E402
from conftest import make_inputs  # noqa: E402

import keras_adapters  # noqa: E402


def stalling_save_file(tensors, filename, metadata=None):
    with open(filename, "wb") as file:
        file.write(b"\0" * 1024)
        file.flush()
        os.fsync(file.fileno())
        print("writing", flush=True)
        time.sleep(600)


def main(path):
    model = make_classifier("bert")
    keras_adapters.add_adapters(model, bottleneck_size=4)
    keras_adapters.save_adapters(model, path)
    print("saved", flush=True)

    fit_briefly(model, make_inputs("bert"))
    safetensors.numpy.save_file = stalling_save_file
    keras_adapters.save_adapters(model, path)


if __name__ == "__main__":
    main(sys.argv[1])
