"""The core imports no runtime: `lint-imports` (make test) checks the layer contracts of
pyproject.toml; this checks that the contracts keep up with the modules."""


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
