"""The architecture, enforced: dependencies flow one way.

- ``optim`` imports torch only: never ``torch.distributed``, ``service``, ``sharding`` or the
  ``orthoshard`` glue.
- ``service`` never imports torch, ``optim`` or ``sharding`` (the sidecar image has no torch).
- ``sharding`` may import ``optim`` and ``torch.distributed``, never ``service``.

Two independent checks, each able to fail (the self-tests plant violations and see them caught):

1. Dynamic: a fresh interpreter imports every module of the package (found with ``pkgutil``, so
   new modules are covered automatically) with the forbidden imports blocked. ``import torch``
   itself loads ``torch.distributed``, so blocking by ``sys.modules`` absence cannot work for it:
   ``builtins.__import__`` and ``importlib.import_module`` are wrapped and refuse a forbidden
   name when the *importing module* belongs to the checked package. Packages that must not be
   loaded at all (torch for the service) are also refused by a meta-path finder, which catches
   transitive imports through third-party code, and checked absent from ``sys.modules`` at the
   end.
2. Static: ``ast`` over every source file, so imports inside functions (never executed by an
   import) and attribute use such as ``torch.distributed.is_initialized()`` are caught too.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> module prefixes it must never import
RULES: dict[str, tuple[str, ...]] = {
    "optim": ("torch.distributed", "service", "sharding", "orthoshard"),
    "service": ("torch", "optim", "sharding"),
    "sharding": ("service",),
}
# prefixes that must not be loaded at all, even transitively, while the package is imported
NOT_LOADED: dict[str, tuple[str, ...]] = {
    "optim": ("service", "sharding"),
    "service": ("torch", "optim", "sharding"),
    "sharding": ("service",),
}

# Run in a fresh interpreter: argv[1] is a JSON config. Prints a JSON report; exit 1 on violation.
CHECKER_SOURCE = r'''
import builtins, importlib, importlib.abc, importlib.util, json, pkgutil, sys

cfg = json.loads(sys.argv[1])
sys.path[:0] = cfg["path"]
target, forbid, not_loaded = cfg["package"], tuple(cfg["forbid"]), tuple(cfg["not_loaded"])
violations = []

def matches(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)

def inside(module_name):
    return module_name == target or module_name.startswith(target + ".")

def requested(name, globals_, fromlist, level):
    if level:
        base = (globals_ or {}).get("__package__") or ""
        parts = base.split(".")
        base = ".".join(parts[: len(parts) - (level - 1)])
        name = f"{base}.{name}" if name else base
    return [name] + [f"{name}.{f}" for f in (fromlist or ()) if f != "*"]

def guard(importer, names):
    if importer and inside(importer):
        for n in names:
            if matches(n, forbid):
                msg = f"{importer} imports {n} (forbidden for {target}: dependencies flow one way)"
                violations.append(msg)
                raise ImportError(msg)

real_import, real_import_module = builtins.__import__, importlib.import_module

def checked_import(name, globals=None, locals=None, fromlist=(), level=0):
    guard((globals or {}).get("__name__"), requested(name, globals, fromlist, level))
    return real_import(name, globals, locals, fromlist, level)

def checked_import_module(name, package=None):
    caller = sys._getframe(1).f_globals.get("__name__")
    guard(caller, [importlib.util.resolve_name(name, package) if name.startswith(".") else name])
    return real_import_module(name, package)

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if matches(fullname, not_loaded):
            msg = f"{fullname} must not be loaded while importing {target}"
            violations.append(msg)
            raise ImportError(msg)
        return None

builtins.__import__ = checked_import
importlib.import_module = checked_import_module
sys.meta_path.insert(0, Refuse())

imported, errors = [], []
try:
    pkg = real_import_module(target)
    imported.append(target)
    for info in pkgutil.walk_packages(pkg.__path__, target + ".",
                                      onerror=lambda n: errors.append(f"{n}: walk failed")):
        try:
            real_import_module(info.name)
            imported.append(info.name)
        except Exception as exc:
            errors.append(f"{info.name}: {type(exc).__name__}: {exc}")
except Exception as exc:
    errors.append(f"{target}: {type(exc).__name__}: {exc}")
loaded = sorted(m for m in sys.modules if matches(m, not_loaded))
if loaded:
    violations.append(f"loaded while importing {target}: {loaded}")
print(json.dumps({"imported": imported, "errors": errors, "violations": violations}))
sys.exit(1 if (errors or violations) else 0)
'''


def run_checker(package: str, forbid: tuple[str, ...], not_loaded: tuple[str, ...],
                path: tuple[str, ...] = ()) -> tuple[int, dict]:
    cfg = {"package": package, "forbid": list(forbid), "not_loaded": list(not_loaded),
           "path": [str(ROOT), *path]}
    proc = subprocess.run([sys.executable, "-c", CHECKER_SOURCE, json.dumps(cfg)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"checker printed nothing; stderr:\n{proc.stderr}"
    return proc.returncode, json.loads(lines[-1])


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


DYNAMIC_IMPORTERS = ("__import__", "importlib.import_module", "import_module")


def static_violations(package_dir: Path, package: str,
                      forbid: tuple[str, ...]) -> list[str]:
    """Forbidden imports (any scope), dynamic imports by string, and attribute chains."""

    def bad(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in forbid)

    found = []
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        is_pkg = rel.name == "__init__"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = module.split(".") if is_pkg else module.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join([*parts, base] if base else parts)
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Call) and node.args and \
                    isinstance(node.args[0], ast.Constant) and \
                    isinstance(node.args[0].value, str) and \
                    _dotted(node.func) in DYNAMIC_IMPORTERS:
                names = [node.args[0].value]
            elif isinstance(node, ast.Attribute) and _dotted(node) in forbid:
                # ``torch.distributed.x()`` after a plain ``import torch``; ast.walk visits the
                # inner ``torch.distributed`` node, so exact matches report each use once
                names = [str(_dotted(node))]
            for name in names:
                if bad(name):
                    found.append(f"{path.relative_to(package_dir.parent)}:{node.lineno}: {name}")
    return sorted(set(found))


# ---- the real packages ------------------------------------------------------------------------

@pytest.mark.parametrize("package", sorted(RULES))
def test_importing_every_module_respects_design_section_1(package):
    code, report = run_checker(package, RULES[package], NOT_LOADED[package])
    assert code == 0, json.dumps(report, indent=2)
    assert report["imported"][0] == package
    # every source file of the package was imported (pkgutil found them all)
    on_disk = {p for p in (ROOT / package).rglob("*.py")}
    assert len(report["imported"]) == len(on_disk), (report["imported"], sorted(on_disk))


@pytest.mark.parametrize("package", sorted(RULES))
def test_no_forbidden_import_anywhere_in_the_source(package):
    assert static_violations(ROOT / package, package, RULES[package]) == []


# ---- self-tests: the checkers catch planted violations ----------------------------------------

def plant(tmp_path: Path, package: str, files: dict[str, str]) -> Path:
    root = tmp_path / package
    for rel, text in {"__init__.py": "", **files}.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(text))
    return root


def test_checkers_catch_optim_importing_torch_distributed(tmp_path):
    plant(tmp_path, "planted_optim", {
        "ok.py": "import torch\nfrom torch import nn\nimport torch.distributions\n",
        "sub/__init__.py": "",
        "sub/bad.py": "from torch import distributed as dist\n",
    })
    code, report = run_checker("planted_optim", RULES["optim"], NOT_LOADED["optim"],
                               (str(tmp_path),))
    assert code == 1
    assert any("planted_optim.sub.bad imports torch.distributed" in v
               for v in report["violations"]), report
    assert "planted_optim.ok" in report["imported"]  # torch.distributions is not distributed
    found = static_violations(tmp_path / "planted_optim", "planted_optim", RULES["optim"])
    assert found == ["planted_optim/sub/bad.py:1: torch.distributed"]


def test_checkers_catch_relative_and_lazy_and_attribute_violations(tmp_path):
    plant(tmp_path, "planted_lazy", {
        "a.py": "def f():\n    import service.store\n",
        "b.py": "def g():\n    import torch\n    return torch.distributed.is_initialized()\n",
        "c.py": "import importlib\nM = importlib.import_module('service')\n",
    })
    # the dynamic check sees the import executed at module level
    code, report = run_checker("planted_lazy", RULES["optim"], NOT_LOADED["optim"],
                               (str(tmp_path),))
    assert code == 1 and any("planted_lazy.c imports service" in v
                             for v in report["violations"]), report
    # the static check sees all three
    found = static_violations(tmp_path / "planted_lazy", "planted_lazy", RULES["optim"])
    assert found == ["planted_lazy/a.py:2: service.store",
                     "planted_lazy/b.py:3: torch.distributed",
                     "planted_lazy/c.py:2: service"]


def test_checkers_catch_service_importing_torch_even_transitively(tmp_path):
    plant(tmp_path, "planted_helper", {"__init__.py": "import torch\n"})
    plant(tmp_path, "planted_service", {"uses_helper.py": "import planted_helper\n"})
    code, report = run_checker("planted_service", RULES["service"], NOT_LOADED["service"],
                               (str(tmp_path),))
    assert code == 1
    assert any("torch must not be loaded" in v for v in report["violations"]), report


def test_checkers_pass_a_clean_planted_package(tmp_path):
    plant(tmp_path, "planted_clean", {"x.py": "import json\nfrom . import y\n", "y.py": ""})
    code, report = run_checker("planted_clean", RULES["service"], NOT_LOADED["service"],
                               (str(tmp_path),))
    assert code == 0, report
    assert sorted(report["imported"]) == ["planted_clean", "planted_clean.x", "planted_clean.y"]
    assert static_violations(tmp_path / "planted_clean", "planted_clean", RULES["service"]) == []
