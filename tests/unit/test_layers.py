"""The import graph of della_cli: no circle, and no import from a lower layer to a higher one
(cli -> api/session -> engine -> plan, io, backends, methods), counting imports made inside
functions too, since those are the ones a circle hides behind."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "della_cli"
# Higher layers first; a module may import only from its own layer or those after it.
LAYERS = [
    {
        "cli",
        "cli_common",
        "cli_examine",
        "cli_merge",
        "cli_methods",
        "cli_parts",
        "cli_plan",
        "cli_sweep",
        "__main__",
        "demo",
    },
    {
        "api",
        "output_files",
        "preflight",
        "plan_report",
        "inspection",
        "sweep",
        "assemble",
        "part_merge",
        "ray_runner",
        "stage_plans",
        "stages",
        "card",
        "card_inputs",
        "verify",
    },
    {
        "session",
        "session_downloads",
        "locate",
        "lora_inputs",
        "devices",
        "hub",
        "hub_errors",
        "hub_settings",
    },
    {"engine"},
    {
        "plan",
        "plan_types",
        "device_plan",
        "planner",
        "sliced_jobs",
        "kernels",
        "parts",
        "plan_parameters",
        "layer_map",
        "architecture",
        "vocab_rows",
        "quant",
        "quantized",
    },
    {
        "recipe",
        "recipe_compat",
        "recipe_fields",
        "recipe_rules",
        "recipe_schema",
        "recipe_scopes",
        "recipe_settings",
        "recipe_slices",
        "recipe_slices_read",
        "recipe_tokenizer",
        "recipe_yaml",
        "chat_template",
        "model_ref",
        "tokenizer_union",
    },
    {"backends"},
    {"methods"},
    {"io", "errors", "sizes", "tiny"},  # the ground floor: shared vocabulary, files, errors
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:`` (never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            guarded = isinstance(child, ast.If) and ast.unparse(child.test) == "TYPE_CHECKING"
            if not guarded:
                stack.append(child)


def imports_of(path: Path) -> set[str]:
    """Every della_cli module ``path`` imports at run time, anywhere in it."""
    found = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("della_cli"):
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("della_cli"))
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = {target for target in imports_of(path) if target in modules}
        edges[name] = {t for t in targets if t != name and not name.startswith(t + ".")}
    return edges


def test_no_import_circle():
    edges = graph()
    visiting, done = set(), set()

    def visit(node: str, trail: list[str]) -> None:
        if node in done:
            return
        if node in visiting:
            circle = [*trail[trail.index(node) :], node]
            pytest.fail("import circle: " + " -> ".join(circle))
        visiting.add(node)
        for target in sorted(edges[node]):
            visit(target, [*trail, node])
        visiting.discard(node)
        done.add(node)

    for node in sorted(edges):
        visit(node, [])


def layer_of(module: str) -> int | None:
    top = module.split(".")[1] if "." in module else ""
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    return None


def test_every_module_has_a_layer():
    """A module missing from LAYERS would escape the check below."""
    tops = {name.split(".")[1] for name in graph() if "." in name}
    assert sorted(tops - set().union(*LAYERS)) == []


def test_no_import_from_a_lower_layer_to_a_higher_one():
    upward = []
    for source, targets in graph().items():
        for target in targets:
            mine, theirs = layer_of(source), layer_of(target)
            if mine is not None and theirs is not None and theirs < mine:
                upward.append(f"{source} imports {target}")
    assert upward == []
