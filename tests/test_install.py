"""Installing lmoec: a wheel carries its grammar, templates and spec library, and the README's two commands
are what CI runs (issue 16)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from lmoec.paths import ROOT

SOURCES = ["pyproject.toml", "setup.py", "README.md", "lmoec", "grammar", "templates", "specs"]


def run(*argv, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what the venv installed
    r = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{argv}: {r.stdout}\n{r.stderr}"
    return r.stdout


def test_wheel_install_checks_and_compiles_outside_the_repository(tmp_path):
    """Build the wheel offline from a copy of the sources (no build/ left in the repository), install it into a
    venv that sees this interpreter's torch, and run lmoec from a folder outside the repository."""
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", tmp_path / "dist",
        src, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("lmoec-*.whl")
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", tmp_path / "venv", cwd=tmp_path)
    python, lmoec = tmp_path / "venv" / "bin" / "python", tmp_path / "venv" / "bin" / "lmoec"
    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel, cwd=tmp_path)

    outside = tmp_path / "work"
    shutil.copytree(ROOT / "specs", outside / "specs")
    where = run(python, "-c", "import lmoec.paths as p; print(p.GRAMMAR); print(p.TEMPLATES); print(p.SPECS)", cwd=outside)
    installed = tmp_path / "venv" / "lib"
    assert all(Path(line).is_relative_to(installed) for line in where.split()), where
    library = Path(where.split()[2])
    out = run(lmoec, "check", "specs/lsm/gla.lsm", library / "models" / "tiny.lsm", cwd=outside)
    assert "gla.lsm: ok: lsm gla (vector)" in out and "tiny.lsm: ok" in out
    run(lmoec, "compile", "specs/lsm/gla.lsm", "-o", "pkg", cwd=outside)
    assert (outside / "pkg" / "gla_triton.py").read_text() == (ROOT / "generated" / "gla" / "gla_triton.py").read_text()


def test_readme_commands_are_what_ci_runs():
    """The README's install command installs what its test command needs, and .ci/run runs both verbatim."""
    readme = (ROOT / "README.md").read_text()
    install, train = re.search(r"^    (pip install .*) && (lmoec train \S+)$", readme, re.M).groups()
    assert re.search(r"^    python -m pytest -q$", readme, re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"\npython3 -m {install}\n" in ci and ci.rstrip().endswith("\npython3 -m pytest -q")
    extra = re.fullmatch(r"pip install -e '\.\[(\w+)\]'", install).group(1)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(rf'^{extra} = \["pytest', pyproject, re.M), f"the [{extra}] extra installs pytest"
