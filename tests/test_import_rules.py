"""House rules: the core never imports the builtin plugins; plugins import only ddkit's public API."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What a plugin (builtin or third-party) may import from ddkit.
PUBLIC_API = ("ddkit", "ddkit.types", "ddkit.errors", "ddkit.io", "ddkit.ops", "ddkit.engine.task", "ddkit.engine.select",
              "ddkit.engine.coco_file", "ddkit.engine.box_rule", "ddkit.engine.keypoint_meta")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_core_never_imports_plugins():
    offenders = [f"{p.relative_to(REPO)} imports {name}" for p in (REPO / "ddkit").rglob("*.py")
                 for name in _imports(p) if name.split(".")[0] in ("plugins", "ddkit_plugins")]
    assert not offenders, offenders


def test_plugins_use_only_the_public_api():
    def allowed(name: str) -> bool:
        return any(name == api or name.startswith(api + ".") for api in PUBLIC_API if api != "ddkit") \
            or name == "ddkit"

    offenders = [f"{p.relative_to(REPO)} imports {name}" for p in (REPO / "plugins").rglob("*.py")
                 for name in _imports(p) if name.split(".")[0] == "ddkit" and not allowed(name)]
    assert not offenders, offenders


def test_import_linter_contract():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint, "import-linter is a test dependency (pip install -e .[test])"
    proc = subprocess.run([lint], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
