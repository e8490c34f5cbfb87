"""The package's imports point down: no circles, and no module importing one above it in the layering

    config/tokenizer -> kernels -> cache/moe -> model -> checkpoint/quantize/parallel -> generate
    -> serve/train/routing/bench -> cli

Read from the source with `ast`, imports inside functions included (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mixtral"

# Layer of each module (dotted name below `mixtral`; a package's name covers its modules unless listed itself).
# Modules of one layer may import each other, without circles.
LAYERS = [
    {"config", "tokenizer", "builtin"},
    {"kernels"},
    {"cache", "moe"},
    {"model"},
    {"checkpoint", "quantize", "parallel", "train.lora", "offload"},
    {"sampling", "constrained", "generate"},
    {"measure"},
    {"serve", "train", "eval", "routing", "bench", "full_scale", "cli_args", "commands"},
    {"cli", "__main__", ""},  # "": the package's own __init__, which hands the public names on
]


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(name: str) -> int:
    """The layer of the longest listed prefix of `name`."""
    best, level = -1, None
    for i, names in enumerate(LAYERS):
        for listed in names:
            if (name == listed or name.startswith(listed + ".") or listed == "") and len(listed) > best:
                best, level = len(listed), i
    assert level is not None, f"mixtral.{name} has no layer: add it to LAYERS"
    return level


def imports_of(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package modules that a module imports (relative or absolute), anywhere in the file."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                stem = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.split(".")[0] == "mixtral":
                stem = node.module.removeprefix("mixtral").removeprefix(".")
            else:
                continue
            targets = [f"{stem}.{a.name}".strip(".") for a in node.names] + [stem]
        elif isinstance(node, ast.Import):
            targets = [
                a.name.removeprefix("mixtral").removeprefix(".") for a in node.names if a.name.startswith("mixtral")
            ]
        for t in targets:
            # `from .kernels import ops` names the module kernels.ops; `from .model import Transformer` names model
            if t in modules:
                found.add(t)
                break
    found.discard(name)
    return found


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package modules it imports."""
    files = sorted(package.rglob("*.py"))
    modules = {module_name(p, package) for p in files}
    return {module_name(p, package): imports_of(p, module_name(p, package), modules) for p in files}


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    return [
        f"mixtral.{a} (layer {layer_of(a)}) imports mixtral.{b} (layer {layer_of(b)})"
        for a, targets in g.items()
        for b in sorted(targets)
        if layer_of(b) > layer_of(a)
    ]


def circles(g: dict[str, set[str]]) -> list[str]:
    """Each import circle found by a depth-first walk, as a -> b -> ... -> a."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    found = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g.get(node, set())):
            if state.get(nxt) == 1:
                found.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    return found


def test_no_module_imports_one_above_it():
    wrong = upward_imports(graph())
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    found = circles(graph())
    assert not found, "\n".join(found)


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path):
    """The two checks above can fail: a made-up package with a lazy circle and an upward import is caught."""
    pkg = tmp_path / "mixtral"
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("from .model import Transformer\n")
    (pkg / "model.py").write_text("def f():\n    from mixtral.config import X\n")
    (pkg / "kernels" / "__init__.py").write_text("")
    (pkg / "kernels" / "ops.py").write_text("from ..model import Transformer\nfrom . import weights\n")
    (pkg / "kernels" / "weights.py").write_text("import torch\n")
    g = graph(pkg)
    assert g["config"] == {"model"} and g["model"] == {"config"} and g["kernels.ops"] == {"model", "kernels.weights"}
    assert circles(g) == ["config -> model -> config"]
    assert len(upward_imports(g)) == 2  # config -> model, kernels.ops -> model
