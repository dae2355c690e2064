"""Nothing from a spec, a checkpoint or the package cache becomes code the user did not write (issue 23).

- spec text (doc comments, the spec's path) reaches generated modules only as data: every emitted module
  parses, is read as UTF-8, keeps its header one comment line, and has exactly the code of the same spec
  without that text; importing packages of hostile specs runs nothing outside lmoec's own (an audit hook
  in a subprocess) and creates no canary file;
- a checkpoint whose package differs from what lmoec emits from its IR is refused (exit 2, one line),
  and runs with --trust-checkpoint-code;
- a cache entry that doesn't hold its package is said, rewritten and never imported; the cache is owner-only.
"""
from __future__ import annotations

import ast
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

import pytest
import torch

from lmoec import compile_spec
from lmoec.backends.emit import emit_package
from lmoec.backends.literal import comment, docstring
from lmoec.cli import generate as generate_cli
from lmoec.cli import train as train_cli
from lmoec.paths import ROOT, SPECS
from lmoec.runtime import loader
from lmoec.trainer import checkpoint as ckpt
from lmoec.trainer.generate import load_model
from lmoec.variants import make_variants, parse_axes
from test_model import tiny_program
from test_train import run_cli

SPEC_FILES = sorted(SPECS.rglob("*.lsm"))

# each piece breaks naive pasting into a docstring, a string or a comment somewhere
ADVERSARIAL = [
    '"', '""', '"""', '""""', "'", "'''", 'ends in a quote"', "\\", "ends in a backslash\\", "\\N{BULLET} \\x41 \\u2028",
    "new\nline", "cr\rlf\r\n", "nul\x00byte", "# hash", "tab\tform\x0cfeed vt\x0b", "fs\x1cgs\x1drs\x1enel\x85",
    "line\u2028para\u2029sep", "bidi \u202eevil\u202c", "unicode é × — 😀",
    "coding: utf-7", "# -*- coding: latin-1 -*-", "+ACIAIgAi-", "trailing spaces   \n   next",
    '""";__import__("os").system("touch /tmp/PWNED");"""', "'''; import os; '''",
]
DOC = "\n".join(ADVERSARIAL) + "\n" + "very long text " * 700
PATH = "specs/evil\"'/\"\"\"'''\\x/\n# coding: utf-7\u2028+ACIAIgAi-\x00\x0c/évil\u202e.lsm"


def as_docstring(text: str) -> str:
    """The value `docstring(text)` must have: trailing whitespace of every line dropped."""
    return "\n".join(line.rstrip() for line in text.split("\n"))


@pytest.mark.parametrize("text", ADVERSARIAL + [DOC, PATH, "lone \ud800 surrogate", "x" * 100_000], ids=range(len(ADVERSARIAL) + 4))
def test_docstring_and_comment_keep_text_data(text):
    assert ast.literal_eval(docstring(text)) == as_docstring(text)
    source = f"# {comment(text)}\n# {comment(text)}\nx = 1\n"
    assert tokenize.detect_encoding(io.BytesIO(source.encode()).readline)[0] == "utf-8"
    kinds = [t.type for t in tokenize.generate_tokens(io.StringIO(source).readline)][:4]
    assert kinds == [tokenize.COMMENT, tokenize.NL, tokenize.COMMENT, tokenize.NL]
    assert len(source.splitlines()) == 3


def _without_docstrings(tree: ast.AST) -> str:
    """The module's code with every docstring emptied."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            body[0].value.value = ""
    return ast.dump(tree)


@pytest.mark.parametrize("spec", SPEC_FILES, ids=[p.stem for p in SPEC_FILES])
def test_hostile_docs_and_path_are_emitted_as_data(spec):
    """Every template of every library spec, with adversarial docs and path: the code is the plain spec's."""
    ir = compile_spec(spec).ir
    hostile, plain = ir.model_copy(deep=True, update={"source": PATH}), ir.model_copy(deep=True, update={"source": "plain.lsm"})
    for lsm in hostile.lsms.values():
        lsm.doc = DOC
    for lsm in plain.lsms.values():
        lsm.doc = ""
    if hostile.model is not None:
        hostile.model.doc = DOC
    files, baseline = emit_package(hostile), emit_package(plain)
    assert sorted(files) == sorted(baseline)
    assert json.loads(files["ir.json"])["source"] == PATH
    for name, text in files.items():
        if not name.endswith(".py"):
            continue
        assert tokenize.detect_encoding(io.BytesIO(text.encode()).readline)[0] == "utf-8", name
        first = [t.type for t in tokenize.generate_tokens(io.StringIO(text).readline)][:2]
        assert first == [tokenize.COMMENT, tokenize.NL], name  # the header stays one comment line
        assert _without_docstrings(ast.parse(text)) == _without_docstrings(ast.parse(baseline[name])), name
    init_doc = ast.get_docstring(ast.parse(files["__init__.py"]), clean=False)
    assert init_doc.startswith(f"Compiled from {as_docstring(PATH)} by lmoec ")
    for lsm in hostile.lsms:
        layer_doc = ast.get_docstring(ast.parse(files[f"{lsm}_layer.py"]), clean=False)
        assert "".join(DOC.split()) in "".join(layer_doc.split())  # wrapped to lines of 100, every character kept


def test_names_and_numbers_from_an_ir_must_be_names_and_finite():
    """An IR read back from a file (a checkpoint's ir.json) is not frontend-checked: the emitters check what they paste."""
    ir = compile_spec(SPECS / "models" / "tiny.lsm").ir
    bad_lsm = ir.model_copy(deep=True)
    bad_lsm.lsms["gla"].name = 'gla"); import os  #'
    bad_model = ir.model_copy(deep=True)
    bad_model.model.name = "tiny\nimport os"
    bad_number = ir.model_copy(deep=True)
    bad_number.model.moe.aux_loss = float("nan")
    for bad, message in [(bad_lsm, "is not a name"), (bad_model, "is not a name"), (bad_number, "finite")]:
        with pytest.raises(ValueError, match=message):
            emit_package(bad)


# ---- hostile specs, compiled and imported in a subprocess under an audit hook ------------------------------

AUDIT = """
import dataclasses, json, os, sys
import torch, triton, triton.language
import lmoec

paths, cache = json.loads(sys.argv[1]), os.environ["LMOEC_CACHE"]
programs = [lmoec.compile_spec(p) for p in paths]
for program in programs:
    program.files
ours = (cache, os.path.dirname(lmoec.__file__))
harmless = {"import", "builtins.id", "object.__getattr__", "object.__setattr__", "object.__delattr__", "sys._getframe",
            "sys._getframemodulename", "marshal.loads", "os.listdir", "os.scandir"}
in_cache = {"os.mkdir", "tempfile.mkdtemp", "os.rename", "shutil.rmtree", "os.chmod"}
violations = []

def by_dataclasses():
    # registering the ops with torch.library defines torch's own dataclasses, whose methods the standard
    # library compiles from its fixed templates: no spec text is in them
    return sys._getframe(2).f_code.co_filename == dataclasses.__file__

def hook(event, args):
    if event in harmless:
        return
    if event in ("compile", "exec") and by_dataclasses():
        return
    if event == "open":
        path, mode, flags = args
        writes = (mode and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR))
        if not writes or str(path).startswith(cache):
            return
    elif event in in_cache and str(args[0]).startswith(cache):
        return
    elif event == "compile" and str(args[1]).startswith(ours):
        return
    elif event == "exec" and getattr(args[0], "co_filename", "").startswith(ours):
        return
    violations.append(f"{event} {args!r:.200}")

sys.addaudithook(hook)
for program in programs:
    program.model() if program.ir.model is not None else program.op()
found = list(violations)
os.system("true")  # the control: the hook sees what an injected call would do
print(json.dumps({"violations": found, "control": any(v.startswith("os.system") for v in violations[len(found):])}))
"""


def _import_under_audit(specs: list[Path], cache: Path) -> dict:
    env = {**os.environ, "LMOEC_CACHE": str(cache), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", AUDIT, json.dumps([str(p) for p in specs])], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_hostile_specs_run_nothing_when_imported(tmp_path):
    """The issue's reproducer and its variants: a doc comment, a path with a newline or an encoding cookie, docs
    carried by `import` and `extends`, variants of a hostile base. Importing their packages runs nothing."""
    canary = tmp_path / "PWNED"
    payload = f'__import__("os").system("touch {canary}")'
    evil = _write(tmp_path / "evil.lsm", f'# """;{payload};"""\nlsm evil {{\n    decay scalar = logsigmoid(x @ W_g)\n}}\n')
    odd_dir = tmp_path / 'new\nline """ \' coding:utf-7 \u2028 dir'
    odd_path = _write(odd_dir / 'sp"ec\nname.lsm', f"# '''; {payload}; ''' \\\n# \x00 +ACIAIgAi-;{payload};+ACIAIgAi-\n"
                                                   "lsm odd {\n    decay vector = logsigmoid(x @ W_g) / 16\n}\n")
    chained = _write(tmp_path / "chained.lsm", textwrap.dedent(f"""\
        import "evil.lsm"
        # \"\"\"\\n{payload}  # the second doc of the chain
        lsm evil2 extends evil {{ short_conv = 4 }}
        # \"\"\"{payload}\"\"\" on the model too
        model chained {{
            vocab = 256  hidden = 32  layers = 2  heads = 2  pattern = "LN"  lsm = evil2
            moe {{ experts = 4 top_k = 2 expert_ffn = 32 }}
            max_seq_len = 64
        }}
        """))
    imported = _write(tmp_path / "imported.lsm", textwrap.dedent("""\
        import "evil.lsm"
        model imported {
            vocab = 256  hidden = 32  layers = 2  heads = 2  pattern = "LL"  lsm = evil
            ffn { ffn = 64 }
        }
        """))
    written, rejected = make_variants(chained, parse_axes(["pattern=LL,NL", "decay=scalar,vector"]), tmp_path / "variants")
    assert len(written) == 4 and not rejected
    variants = [tmp_path / "variants" / v["spec"] for v in written]
    assert all(compile_spec(p).ir.lsm().doc.startswith('"""') for p in [chained, *variants])  # the docs did flow

    result = _import_under_audit([evil, odd_path, chained, imported, *variants], tmp_path / "cache")
    assert result["control"], "the audit hook must see os.system"
    assert result["violations"] == []
    assert not canary.exists()


# ---- checkpoints ------------------------------------------------------------------------------------------------

SMALL = ["--steps", "2", "--seq-len", "8", "--batch", "2", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real run (2 steps of a tiny LN model) trained from a compiled package directory, through the CLI."""
    root = tmp_path_factory.mktemp("security_run")
    corpus = _write(root / "data.txt", "the quick brown fox jumps over the lazy dog. " * 100)
    package = tiny_program("LN").write(root / "pkg")
    assert run_cli(train_cli, str(package), "--data", str(corpus), *SMALL, "--out", str(root / "run")) == 0
    return root


def _tampered_copy(run_dir: Path, dest: Path, canary: Path) -> Path:
    """A copy of the run whose checkpoint's model.py also creates `canary` when imported."""
    shutil.copytree(run_dir / "run", dest)
    state = torch.load(dest / ckpt.FILENAME, weights_only=True)
    state["package"]["files"]["model.py"] += f"\nopen({str(canary)!r}, 'w').close()\n"
    torch.save(state, dest / ckpt.FILENAME)
    return dest


def _refusal(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "'model.py' differs from what lmoec" in err and "--trust-checkpoint-code" in err, err
    return err


def test_tampered_checkpoint_is_refused_by_generate_unless_trusted(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMOEC_CACHE", str(tmp_path / "cache"))
    canary = tmp_path / "PWNED"
    run = _tampered_copy(run_dir, tmp_path / "run", canary)
    argv = [str(run), "--prompt", "the", "--max-new-tokens", "2", "--temperature", "0"]
    assert run_cli(generate_cli, *argv) == 2
    assert _refusal(capsys).startswith("lmoec generate: error: ")
    assert not canary.exists()
    with pytest.raises(ckpt.CheckpointError, match="differs from what lmoec"):
        load_model(run)
    assert not canary.exists()
    assert run_cli(generate_cli, *argv, "--trust-checkpoint-code") == 0
    assert canary.exists()  # trusted: the checkpoint's own code ran


def test_tampered_checkpoint_is_refused_by_resume_unless_trusted(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMOEC_CACHE", str(tmp_path / "cache"))
    canary = tmp_path / "PWNED"
    run = _tampered_copy(run_dir, tmp_path / "run", canary)
    before = (run / ckpt.FILENAME).read_bytes()
    argv = [str(run_dir / "pkg"), "--data", str(run_dir / "data.txt"), *SMALL[2:], "--steps", "3", "--out", str(run), "--resume"]
    assert run_cli(train_cli, *argv) == 2
    assert _refusal(capsys).startswith("lmoec train: error: ")
    assert not canary.exists() and (run / ckpt.FILENAME).read_bytes() == before
    assert run_cli(train_cli, *argv, "--trust-checkpoint-code") == 0
    assert canary.exists() and ckpt.load(run)["step"] == 3


def test_untouched_checkpoint_loads_and_resumes(run_dir, tmp_path):
    run = Path(shutil.copytree(run_dir / "run", tmp_path / "run"))
    model, state = load_model(run)
    assert state["step"] == 2 and not model.training
    argv = [str(run_dir / "pkg"), "--data", str(run_dir / "data.txt"), *SMALL[2:], "--steps", "3", "--out", str(run), "--resume"]
    assert run_cli(train_cli, *argv) == 0
    assert ckpt.load(run)["step"] == 3


@pytest.mark.parametrize("change, message", [
    (lambda files: files.pop("ir.json"), "has no ir.json"),
    (lambda files: files.update({"ir.json": '{"source": "x"}'}), "can't emit its package's ir.json"),
    (lambda files: files.update({"ir.json": files["ir.json"].replace('"layers": 2', '"layers": 3')}), "'config.json' differs"),
    (lambda files: files.update({"extra.py": "import os\n"}), "'extra.py' differs"),
])
def test_checkpoint_package_must_be_what_its_ir_emits(run_dir, change, message):
    state = ckpt.load(run_dir / "run")
    files = dict(state["package"]["files"])
    change(files)
    state = {**state, "package": {"name": state["package"]["name"], "files": files}}
    with pytest.raises(ckpt.CheckpointError, match=message) as caught:
        ckpt.package(state, run_dir / "run")
    assert "\n" not in str(caught.value)
    assert ckpt.package(state, run_dir / "run", trust_code=True)[1] is files


@pytest.mark.parametrize("stored", [None, {"name": "x"}, {"name": "x", "files": {1: "text"}}, {"name": "x", "files": {"a.py": b"x"}}])
def test_checkpoint_without_a_package_of_text_is_refused(stored):
    with pytest.raises(ckpt.CheckpointError, match="holds no package"):
        ckpt.package({"package": stored}, "run", trust_code=True)


# ---- the package cache ------------------------------------------------------------------------------------------


def test_cache_is_owner_only(tmp_path, monkeypatch):
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o755)
    for path in (loose, tmp_path / "fresh" / "cache"):
        monkeypatch.setenv("LMOEC_CACHE", str(path))
        assert loader.cache_dir() == path and stat.S_IMODE(path.stat().st_mode) == 0o700
    monkeypatch.setattr(os, "getuid", lambda: loose.stat().st_uid + 1)
    monkeypatch.setenv("LMOEC_CACHE", str(loose))
    with pytest.raises(PermissionError, match="belongs to another user"):
        loader.cache_dir()


def _forget(module) -> None:
    for name in [n for n in sys.modules if n == module.__name__ or n.startswith(module.__name__ + ".")]:
        del sys.modules[name]


def test_tampered_cache_entry_is_said_rewritten_and_not_imported(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMOEC_CACHE", str(tmp_path / "cache"))
    files = tiny_program("NN").files
    module = loader.load_package("security_cache", files)
    module.model.build()
    entry = Path(module.__file__).parent
    assert entry.parent == tmp_path / "cache" and not (entry / "__pycache__").exists()  # no .pyc is ever written
    _forget(module)
    canary = tmp_path / "PWNED"
    code = f"\nopen({str(canary)!r}, 'w').close()\n"
    elsewhere = _write(tmp_path / "elsewhere.py", files["model.py"] + code)

    def append():
        with open(entry / "model.py", "a") as f:
            f.write(code)

    tampers = [
        ("model.py", append),
        ("evil.py", lambda: _write(entry / "evil.py", code)),
        ("model.py", lambda: ((entry / "model.py").unlink(), (entry / "model.py").symlink_to(elsewhere))),
        ("__init__.py", lambda: (entry / "__init__.py").unlink()),
    ]
    for differing, tamper in tampers:
        tamper()
        capsys.readouterr()
        module = loader.load_package("security_cache", files)
        module.model.build()
        err = capsys.readouterr().err
        assert err.startswith(f"lmoec: warning: the cached package {entry} does not hold what it must ({differing} differs)")
        assert len(err.strip().splitlines()) == 1
        assert not canary.exists()
        assert {p.name: p.read_text() for p in entry.iterdir() if not p.is_symlink()} == files
        _forget(module)

    module = loader.load_package("security_cache", files)  # an intact entry is imported silently
    assert capsys.readouterr().err == ""
    _forget(module)


def test_package_name_cannot_leave_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMOEC_CACHE", str(tmp_path / "cache"))
    module = loader.load_package("../../escape/..", tiny_program("NN").files)
    assert Path(module.__file__).parent.parent == tmp_path / "cache"
    _forget(module)

