"""The built-in example: tiny models made on the spot, merged with DELLA, loaded and run.

It exercises the whole path a real merge takes (safetensors folders written by transformers,
the recipe, the streaming engine, the output folder) in a few seconds and with no network.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from della_cli.api import MergeOptions, MergeReport, run_merge
from della_cli.tiny import make_demo_models


def run_demo(folder: Path, say: Callable[[str], None]) -> MergeReport:
    """Build tiny Llama models in ``folder``, merge them, generate from the result."""
    say(f"building a tiny Llama base and two experts in {folder}")
    recipe = make_demo_models(folder)
    say(f"recipe {recipe}:\n" + recipe.read_text().rstrip())
    out = folder / "merged"
    report = run_merge(recipe, out, MergeOptions(device="cpu", overwrite=True))
    say(f"merged {report.tensors} tensors with {report.method} in {report.seconds:.2f}s -> {out}")
    say("loading the merged model with transformers and generating:")
    say("  " + generate(out, "w1 w2 w3"))
    return report


def generate(folder: Path, prompt: str, new_tokens: int = 8) -> str:
    """Greedy generation from a model folder; proves the output loads and runs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return f"{prompt!r} -> {tokenizer.decode(output[0], skip_special_tokens=True)!r}"
