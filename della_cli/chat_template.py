"""A recipe's ``chat_template``: ``auto``, a named template or a Jinja template, as in mergekit.

mergekit 0.1.5 (``merge.py:_set_chat_template``): ``auto`` takes the most common template among
the models (each stripped; a set of named templates counts by its ``default``); a short line
without ``{`` names one of the templates it ships (copied into ``chat_templates/``, see the
NOTICE there); anything else is a Jinja template used verbatim. The output's tokenizer gets it
where transformers reads it: ``chat_template.jinja`` (transformers >= 4.5x, which prefers that
file) and, for older loaders, the ``chat_template`` entry of ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

from della_cli.errors import RecipeError

TEMPLATES_DIR = Path(__file__).resolve().parent / "chat_templates"
TEMPLATE_FILE = "chat_template.jinja"
EXTRA_TEMPLATES_DIR = "additional_chat_templates"


def named_templates() -> list[str]:
    return sorted(path.stem for path in TEMPLATES_DIR.glob("*.jinja"))


def _is_name(value: str) -> bool:
    """mergekit's test for a template name rather than a template."""
    return len(value) < 256 and "\n" not in value and "{" not in value


def check_chat_template(value: object, path: str) -> str | None:
    """The recipe's value, refused when mergekit would refuse it (an unknown name, a template
    shorter than 20 characters or without ``{``)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecipeError(f"{path}: must be a string, got {value!r}")
    if value == "auto" or (_is_name(value) and value in named_templates()):
        return value
    if _is_name(value) or len(value) < 20:
        names = ", ".join(named_templates())
        raise RecipeError(
            f"{path}: {value!r} is neither auto, a named template ({names}) nor a Jinja "
            "template (at least 20 characters, with '{')"
        )
    return value


def template_text(value: str) -> str:
    """The Jinja text of a named template, or ``value`` itself (not for ``auto``)."""
    if _is_name(value):
        return (TEMPLATES_DIR / f"{value}.jinja").read_text()
    return value


def model_chat_template(folder: Path) -> str | None:
    """The chat template transformers would load from ``folder`` (its default one), if any."""
    jinja = folder / TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text()
    config_path = folder / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    try:
        template = json.loads(config_path.read_text()).get("chat_template")
    except (ValueError, AttributeError):
        return None
    if isinstance(template, list):  # transformers' form of several named templates
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def choose_auto(folders: list[tuple[str, Path]]) -> tuple[str | None, str]:
    """``auto``'s template among the models (label, folder), and a note saying whose it is.

    The most common stripped template wins; a tie goes to the first in recipe order (mergekit
    breaks it by the order of a set, which varies between runs)."""
    templates = {label: model_chat_template(folder) for label, folder in folders}
    found = {label: t.strip() for label, t in templates.items() if t and t.strip()}
    if not found:
        return None, "chat_template: auto found no chat template in any model; none is set"
    counts = Counter(found.values())
    best = max(counts.values())
    chosen = next(t for t in found.values() if counts[t] == best)
    owners = [label for label, t in found.items() if t == chosen]
    return chosen, (
        f"chat_template: auto chose the template of '{owners[0]}' "
        f"({len(owners)} of {len(folders)} models have it)"
    )


def write_chat_template(folder: Path, template: str) -> bool:
    """Make ``template`` the chat template of the tokenizer saved in ``folder``; False when
    there is no tokenizer there to give it to."""
    config_path = folder / "tokenizer_config.json"
    if not config_path.is_file():
        return False
    (folder / TEMPLATE_FILE).write_text(template)
    shutil.rmtree(folder / EXTRA_TEMPLATES_DIR, ignore_errors=True)
    config = json.loads(config_path.read_text())
    if isinstance(config, dict) and "chat_template" in config:
        config["chat_template"] = template
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return True
