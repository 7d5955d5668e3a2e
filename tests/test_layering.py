"""The package's layering (../shared/DESIGN.md): models never import pipelines or conversion; the scheduler imports no
models; conversion hands components up and never imports the pipelines (no import circle). Checked on the source
files' import statements."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "diffusers_magi"


def _imported_packages(path: Path):
    """Subpackages of diffusers_magi that `path` imports (relative or absolute), anywhere in the file."""
    tree = ast.parse(path.read_text())
    own = path.relative_to(PACKAGE).parts[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1:
                found.add(own)
            elif node.level == 2:
                found.add(module.split(".")[0] if module else "")
            elif module.startswith("diffusers_magi."):
                found.add(module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("diffusers_magi."))
    return found


@pytest.mark.parametrize(
    "layer, forbidden",
    [("models", {"pipelines", "conversion", "modular", "training"}), ("schedulers", {"models", "pipelines", "conversion"}), ("conversion", {"pipelines", "modular"})],
)
def test_layers_do_not_import_upwards(layer, forbidden):
    for path in sorted((PACKAGE / layer).glob("*.py")):
        wrong = _imported_packages(path) & forbidden
        assert not wrong, f"{path.relative_to(PACKAGE)} imports {sorted(wrong)}"
