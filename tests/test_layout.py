"""Imports run one way between the packages (README "Layout")."""

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# What each package may import besides itself.
ALLOWED = {
    "guided_diffusion": set(),
    "data": {"guided_diffusion"},
    "evaluation": {"data", "guided_diffusion"},
    "preseg": {"data", "guided_diffusion"},
    "denoiser": {"preseg", "data", "guided_diffusion"},
    "supervised": {"preseg", "data", "guided_diffusion"},
}


def imported_packages(path: Path) -> set:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_run_one_way(package):
    ours = set(ALLOWED) | {"benchmarks", "tests", "sample", "train_addpm", "train_preseg_network",
                           "train_denoising_network"}
    for path in sorted((REPO_ROOT / package).glob("*.py")):
        wrong = (imported_packages(path) & ours) - ALLOWED[package] - {package}
        assert not wrong, f"{path.relative_to(REPO_ROOT)} imports {sorted(wrong)}"
