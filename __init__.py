"""Installs the top-level `cli.py` as `cosa.app.cli`.

(See `[tool.setuptools.package-dir]` in pyproject.toml.)

The repository root is not a package anyone imports; this file only gives `cosa.app` a real
`__init__` so that editable installs resolve `cosa.app.cli` without squatting a top-level `cli`
name.
"""
