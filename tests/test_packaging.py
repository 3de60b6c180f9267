"""The package installs beside a user's torch: ranges, not pins; the offline-demo packages in an extra."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements(items: list[str]) -> dict[str, Requirement]:
    return {Requirement(r).name: Requirement(r) for r in items}


def test_torch_and_torchvision_are_ranges_up_to_the_next_major():
    deps = _requirements(PROJECT["dependencies"])
    tested = {line.split("==")[0]: line.split("==")[1] for line in (ROOT / "constraints.txt").read_text().split()
              if "==" in line}
    for name in ("torch", "torchvision"):
        spec = deps[name].specifier
        assert not any(s.operator == "==" for s in spec), f"{name} is pinned: {spec}"
        low = Version(tested[name])
        assert low in spec and Version(f"{low.major}.{low.minor + 1}") in spec  # newer minors admitted
        assert Version(f"{low.major + 1}.0") not in spec and Version(f"{low.major}.{low.minor}.0rc0") not in spec
        assert min(Version(s.version) for s in spec if s.operator == ">=") == low  # the tested lower bound
        assert Version(version(name).split("+")[0]) in spec  # this environment's own


def test_offline_packages_are_an_extra_that_dev_includes():
    base = _requirements(PROJECT["dependencies"])
    extras = PROJECT["optional-dependencies"]
    offline = set(_requirements(extras["offline"]))
    assert offline == {"gensim", "gguf", "accelerate"} and not offline & set(base)
    assert any(Requirement(r).name == "dsf-lightning" and "offline" in Requirement(r).extras for r in extras["dev"])


def test_installing_keeps_the_torch_already_there(tmp_path):
    """pip's own resolver, offline (--no-index: it may only use what is installed), on this venv, which holds a
    supported torch: installing the package changes nothing but the package itself."""
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-index",
                           "--no-build-isolation", "--report", str(report), "-e", str(ROOT)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    installs = [(i["metadata"]["name"], i["metadata"]["version"]) for i in json.loads(report.read_text())["install"]]
    assert installs == [("dsf-lightning", version("dsf-lightning"))]  # torch and torchvision stay as they are
