"""The package layout follows the data flow: sampling -> calibration -> tracing -> stats -> analysis -> report."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "taq"
# Stages in flow order; a module may import its own stage and earlier ones, never a later one. The phase 3
# commands (quantize, evaluate) and the main job sit above the report, which draws their results.
FLOW = ["taq.sampling", "taq.calibration", "taq.tracing", "taq.profiling", "taq.analysis", "taq.quant", "taq.report",
        "taq.quantization", "taq.evaluate", "taq.pipeline"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("taq")}


def stage(name: str) -> int | None:
    for index, prefix in enumerate(FLOW):
        if name == prefix or name.startswith(prefix + "."):
            return index
    return None


MODULES = {module_name(path): imported_modules(path) for path in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(name for name in MODULES if stage(name) is not None))
def test_no_module_imports_a_later_stage_of_the_flow(module):
    later = sorted(name for name in MODULES[module] if (stage(name) or -1) > stage(module))
    assert not later, f"{module} imports {later}, which come later in {' -> '.join(FLOW)}"


def test_formats_and_models_import_no_driver_and_loading_sits_above_models_and_pocket():
    drivers = ("taq.calibration", "taq.profiling", "taq.pipeline", "taq.report", "taq.analysis")
    for module, imports in MODULES.items():
        if module.startswith(("taq.formats", "taq.models", "taq.pocket")):
            assert not [name for name in imports if name.startswith(drivers)], module
        if module.startswith(("taq.models", "taq.pocket")):
            assert "taq.loading" not in imports, module


def test_the_analysis_layer_imports_without_matplotlib_or_mlx():
    blocker = ("import sys\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in ('matplotlib', 'mlx'):\n"
               "            raise ImportError(f'{name} is blocked')\n"
               "sys.meta_path.insert(0, Block())\n"
               "import taq.analysis, taq.analysis.claims\n"
               "print(len(taq.analysis.CLAIMS))\n")
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True,
                            cwd=PACKAGE.parent, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 7
