"""A wheel (non-editable install) carries every shipped asset: pyproject's package-data globs
match each file in soda/assets, or `encode` and the digits models fail installed elsewhere."""
import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_package_data_covers_the_assets():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["soda"]
    assets = sorted(p.relative_to(ROOT / "soda").as_posix() for p in (ROOT / "soda" / "assets").iterdir() if p.is_file())
    assert assets, "soda/assets is empty"
    missing = [a for a in assets if not any(fnmatch.fnmatch(a, g) for g in globs)]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
