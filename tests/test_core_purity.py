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
