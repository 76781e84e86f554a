"""The import graph of ``pipeline/`` runs downwards only (README, "Architecture"): read from
the source with ``ast``, nothing is executed, function-level imports count too."""
import ast
import sys
from pathlib import Path

import pytest

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"

# top to bottom; a module belongs to the first entry that is a prefix of its dotted name
LAYERS = [
    ("applications", ("pipeline.bench", "pipeline.compare", "pipeline.train.__main__", "pipeline.eval.__main__")),
    ("training", ("pipeline.train",)),
    ("evaluation", ("pipeline.eval",)),
    ("building", ("pipeline.models", "pipeline.data", "pipeline.config", "pipeline.configs")),
    ("core", ("pipeline.tokens", "pipeline.files", "pipeline.device")),
]


def layer_of(module: str) -> int:
    """The layer's index in LAYERS (0 is the top); a module in no layer is an error, so that a
    new top-level module is placed on purpose."""
    if module == "pipeline":  # the bare package: its __init__ imports nothing
        return len(LAYERS) - 1
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer of tests/test_layering.py's LAYERS")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PIPELINE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every ``pipeline`` import in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found += [(node.lineno, _submodule_or_package(target, a.name)) for a in node.names]
    return [(line, m) for line, m in found if m == "pipeline" or m.startswith("pipeline.")]


def _submodule_or_package(package: str, name: str) -> str:
    """``from pipeline.train import autobatch`` imports the module pipeline.train.autobatch;
    ``from pipeline.models import build_model`` the package pipeline.models."""
    path = PIPELINE.parent.joinpath(*package.split("."), name)
    return f"{package}.{name}" if path.with_suffix(".py").is_file() or path.is_dir() else package


def upward_imports() -> list[str]:
    bad = []
    for path in sorted(PIPELINE.rglob("*.py")):
        here = module_name(path)
        for line, target in imported_modules(path):
            if layer_of(target) < layer_of(here):
                bad.append(f"{path.relative_to(PIPELINE.parent)}:{line}: {here} ({LAYERS[layer_of(here)][0]}) "
                           f"imports {target} ({LAYERS[layer_of(target)][0]})")
    return bad


def test_no_module_imports_a_higher_layer():
    assert upward_imports() == []


def test_the_walk_sees_relative_function_level_and_submodule_imports(tmp_path, monkeypatch):
    fake = tmp_path / "pipeline"
    (fake / "models").mkdir(parents=True)
    (fake / "train").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "train" / "__init__.py").write_text("")
    (fake / "train" / "loop.py").write_text("")
    (fake / "models" / "__init__.py").write_text("")
    (fake / "models" / "bad.py").write_text("def f():\n    from ..train import loop\n    import pipeline.eval.tasks\n")
    monkeypatch.setattr(sys.modules[__name__], "PIPELINE", fake)
    assert imported_modules(fake / "models" / "bad.py") == [(2, "pipeline.train.loop"), (3, "pipeline.eval.tasks")]
    found = upward_imports()
    assert len(found) == 2 and all("pipeline.models.bad (building)" in line for line in found)


@pytest.mark.parametrize("module, layer", [("pipeline.bench", "applications"), ("pipeline.train.autobatch", "training"),
                                           ("pipeline.eval.tasks", "evaluation"), ("pipeline.models.weights", "building"),
                                           ("pipeline.tokens.plan", "core")])
def test_layers_are_assigned_by_the_longest_meaningful_prefix(module, layer):
    assert LAYERS[layer_of(module)][0] == layer
