"""Run merge cases through mergekit 0.1.5; executed by mergekit's own Python, not by pytest.

    python mergekit_method_oracle.py INPUTS.safetensors CASES.json OUTPUTS.safetensors

Each case of CASES.json is ``{"id", "method", "inputs": [tensor names], "base_index",
"parameters"}``; the output of case ``id`` is saved under that name. Imports mergekit only.
"""

from __future__ import annotations

import json
import sys

import torch
from mergekit.merge_methods.api import merge_tensors
from safetensors.torch import load_file, save_file


def main(inputs_path: str, cases_path: str, outputs_path: str) -> None:
    tensors = load_file(inputs_path)
    with open(cases_path, encoding="utf-8") as handle:
        cases = json.load(handle)
    torch.manual_seed(0)  # arcee_fusion samples above 1M entries from the global generator
    outputs = {}
    for case in cases:
        result = merge_tensors(
            [tensors[name] for name in case["inputs"]],
            case["method"],
            parameters=case["parameters"],
            base_index=case["base_index"],
        )
        outputs[case["id"]] = result.clone().contiguous()  # outputs may alias inputs
    save_file(outputs, outputs_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
