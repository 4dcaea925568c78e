"""The shapes world's layering: loading its rewards imports neither the flow models nor the
sampler, checked at run time (a fresh interpreter) and in the source (every import); its old
import paths still work for one release, with a DeprecationWarning."""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import smartgrpo_fast

PACKAGE = Path(smartgrpo_fast.__file__).resolve().parent
#: Modules the rewards must not reach: the flow models, the sampler, diffusers.
FORBIDDEN = ("smartgrpo_fast.models", "smartgrpo_fast.sde", "diffusers")


def _forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def _imports(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, at any depth, relative ones resolved;
    ``from a import b`` counts as a and as a.b (b may be a module)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return out


def test_loading_the_rewards_imports_neither_models_nor_sde() -> None:
    code = (
        "import importlib, pkgutil, sys, warnings\n"
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        "import smartgrpo_fast.rewards as r\n"
        "for name in ('tiny', 'tiny-prob', 'tiny-min', 'tiny-color', 'shapes-judge'):\n"
        "    r.load(name)\n"
        "for m in pkgutil.iter_modules(r.__path__):\n"
        "    importlib.import_module(f'smartgrpo_fast.rewards.{m.name}')\n"
        "bad = sorted(m for m in sys.modules\n"
        f"             if any(m == f or m.startswith(f + '.') for f in {FORBIDDEN!r}))\n"
        "assert not bad, bad\n"
        "assert 'smartgrpo_fast.shapes.reward' in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr


def test_no_reward_module_imports_models_or_sde() -> None:
    """The source of every module of rewards/, and of the shapes modules the rewards load."""
    files = [(p, "smartgrpo_fast.rewards") for p in sorted((PACKAGE / "rewards").rglob("*.py"))]
    files += [(PACKAGE / "shapes" / f, "smartgrpo_fast.shapes") for f in
              ("__init__.py", "data.py", "reward.py", "judge.py")]  # fmt: skip
    assert len(files) > 6
    bad = [
        f"{path.relative_to(PACKAGE)}:{line}: {module}"
        for path, package in files
        for line, module in _imports(path, package)
        if _forbidden(module)
    ]
    assert not bad, bad


@pytest.mark.parametrize(
    "old, name, new",
    [
        ("smartgrpo_fast.models.tiny", "sample_prompts", "smartgrpo_fast.shapes.data"),
        ("smartgrpo_fast.models.tiny.data", "render", "smartgrpo_fast.shapes.data"),
        ("smartgrpo_fast.models.tiny.model", "TinyFlowModel", "smartgrpo_fast.shapes.model"),
        ("smartgrpo_fast.models.tiny.model", "tokenize", "smartgrpo_fast.shapes.data"),
        ("smartgrpo_fast.models.tiny.train", "train_flow", "smartgrpo_fast.shapes.train_model"),
        ("smartgrpo_fast.models.tiny.grid", "save_grid", "smartgrpo_fast.shapes.grid"),
        ("smartgrpo_fast.rewards.tiny", "TinyClassifierReward", "smartgrpo_fast.shapes.reward"),
        ("smartgrpo_fast.rewards.tiny", "train_classifier", "smartgrpo_fast.shapes.train_reward"),
        ("smartgrpo_fast.rewards.tiny", "generation_accuracy", "smartgrpo_fast.shapes.evaluate"),
    ],
)
def test_old_paths_warn_and_reexport(monkeypatch, old: str, name: str, new: str) -> None:
    """The modules of models/tiny/ and rewards/tiny.py are shims for one release."""
    monkeypatch.delitem(sys.modules, old, raising=False)  # restored after the test
    with pytest.warns(DeprecationWarning, match=rf"^{re.escape(old)} is deprecated.*shapes"):
        shim = importlib.import_module(old)
    assert getattr(shim, name) is getattr(importlib.import_module(new), name)
    assert name in shim.__all__
