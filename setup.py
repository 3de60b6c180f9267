"""Package list only; all other metadata lives in pyproject.toml.

``dsf_lightning.callbacks`` lives in the top-level folder ``callbacks/`` (package-dir mapping
in pyproject.toml); ``packages.find`` cannot see through such a mapping, hence this shim.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["dsf_lightning", "dsf_lightning.*"])
packages += ["dsf_lightning.callbacks"] + [f"dsf_lightning.callbacks.{p}" for p in find_packages("callbacks")]
setup(packages=packages)
