"""Ships grammar/, templates/ and specs/ in the wheel, as lmoec/grammar, lmoec/templates and lmoec/specs.

In the repository they stay top-level folders (the design names them): setuptools maps each to a data-only
package inside lmoec, and lmoec/paths.py finds them inside the package (a wheel) or beside it (a checkout,
an editable install). Everything else is in pyproject.toml.
"""
from setuptools import find_packages, setup

DATA = {"grammar": ["*.lark"], "templates": ["**/*.j2"], "specs": ["**/*.lsm"]}

setup(
    packages=find_packages(include=["lmoec", "lmoec.*"]) + [f"lmoec.{folder}" for folder in DATA],
    package_dir={f"lmoec.{folder}": folder for folder in DATA},
    package_data={f"lmoec.{folder}": globs for folder, globs in DATA.items()},
)
