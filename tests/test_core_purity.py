"""The core imports no runtime: recsys/ and features/ never pull in Ray, MLflow or the web stack."""

import subprocess
import sys


def test_core_modules_import_no_runtime():
    code = (
        "import pkgutil, importlib, sys, recsys, features\n"
        "for pkg in (recsys, features):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "rt = ('ray', 'mlflow', 'fastapi', 'uvicorn', 'starlette')\n"
        "bad = [m for m in rt if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core imports {out.stdout.strip()}"


def test_layer_contracts_name_every_core_module():
    """The import-linter contracts (pyproject.toml, run by `make test`) forbid the data contracts
    and features every other core module by name: a new module must join those lists."""
    import pkgutil
    import tomllib
    from pathlib import Path

    import recsys

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    contracts = tomllib.loads(pyproject.read_text())["tool"]["importlinter"]["contracts"]
    others = {
        f"recsys.{m.name}"
        for m in pkgutil.iter_modules(recsys.__path__)
        if m.name not in {"data", "io", "errors"}
    }
    by_source = {tuple(c["source_modules"]): set(c["forbidden_modules"]) for c in contracts}
    for source in (("features",), ("recsys.data", "recsys.io", "recsys.errors")):
        missing = others - by_source[source]
        assert not missing, f"contract for {source} does not forbid {sorted(missing)}"
