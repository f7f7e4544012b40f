"""The built-in example: tiny models made on the spot, merged with DELLA, loaded and run.

It exercises the whole path a real merge takes (safetensors folders written by transformers,
the recipe, the streaming engine, the output folder) in a few seconds and with no network, and
keeps its models in a folder of their own so that the example recipes in ``recipes/demo/``
(and the user's own) can merge them again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from della_cli.api import MergeOptions, MergeReport, run_merge
from della_cli.errors import UsageError
from della_cli.tiny import make_demo_models

DEFAULT_FOLDER = Path("della-demo")
# A demo folder holds this file: only such a folder (or an empty one) is rebuilt in place.
MARKER = ".della-demo"
# The example recipes of a source checkout, written for models in ./della-demo.
EXAMPLES = Path("recipes") / "demo"


def run_demo(folder: Path, say: Callable[[str], None]) -> MergeReport:
    """Build tiny Llama models in ``folder``, merge them, generate from the result, and say
    what to run next."""
    _check_folder(folder)
    say(f"building a tiny Llama base and two experts in {folder}/")
    recipe = make_demo_models(folder)
    (folder / MARKER).write_text("made by `della demo`; safe to delete\n")
    say(f"the recipe, {recipe}:\n" + _indent(recipe.read_text()))
    out = folder / "merged"
    options = MergeOptions(device="cpu", overwrite=True, progress=False)
    report = run_merge(recipe, out, options, on_notice=lambda message: say(f"note: {message}"))
    say(f"merged {report.tensors} tensors with {report.method} in {report.seconds:.2f}s -> {out}/")
    say("loading the merged model with transformers and generating:")
    say("  " + generate(out, "w1 w2 w3"))
    say(next_steps(folder))
    return report


def _check_folder(folder: Path) -> None:
    """Refuse to build into a folder that holds anything but an earlier demo."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise UsageError(f"{folder} exists and is not a folder; choose another demo folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MARKER).is_file():
        raise UsageError(
            f"{folder} already holds files that `della demo` did not make; "
            "choose another folder: della demo FOLDER"
        )


def next_steps(folder: Path) -> str:
    """The commands a newcomer can run next, on the models the demo just kept."""
    lines = [
        f"the models stay in {folder}/ (delete it when done). Next:",
        f"  della plan {folder}/recipe.yaml              # what a merge reads, writes and needs",
        f"  della merge {folder}/recipe.yaml {folder}/again --seed 7   # other random draws",
        f"  della verify {folder}/merged                 # check a merged folder",
    ]
    if folder == DEFAULT_FOLDER and EXAMPLES.is_dir():
        lines.append(
            f"  della merge {EXAMPLES}/ties.yaml {folder}/ties    "
            f"# another method: every file in {EXAMPLES}/ runs on these models"
        )
    lines.append(
        "then write a recipe for your own models: see recipes/README.md and `della methods`"
    )
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.rstrip().splitlines())


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
