"""Issue 16, the frontend's part: every reproducer of a crash, a hang, a `check` that said ok before
`compile` failed, a model that crashed at run time, or a message without a place.

Each rejected spec runs through `lmoec check` and `lmoec compile -o OUT` in process: exit status 2,
one diagnostic at `path:line:col` (or `path:` for a file as a whole), no traceback, nothing written.
Each accepted one compiles and its layer runs forward on CPU with finite output.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lmoec
from lmoec.cli import main
from lmoec.errors import SpecError
from lmoec.paths import ROOT, TEMPLATES
from lmoec.passes.validate import MODULE_NAMES, RESERVED_NAMES

GLA = ROOT / "specs" / "lsm" / "gla.lsm"
LSM = "lsm a {{\n    {}\n}}\n"  # one statement in an lsm block: the statement is at line 2, column 5
MODEL = 'import "{gla}"\nmodel m {{\n    vocab = 256 hidden = 64 heads = 4 lsm = gla\n    {}\n}}\n'


def write(tmp_path: Path, content, name: str = "s.lsm") -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def rejected(tmp_path: Path, capsys, content, where: str, message: str, name: str = "s.lsm") -> str:
    """`check` and `compile` both exit 2 with one diagnostic at `where` ("LINE:COL" or "" for the file), writing nothing."""
    path = write(tmp_path, content, name)
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv in (["check", str(path)], ["compile", str(path), "-o", str(out)]):
        start = time.process_time()  # CPU time: on a shared machine wall time measures the neighbours
        assert main(argv) == 2
        assert time.process_time() - start < 2, f"{argv[0]} took {time.process_time() - start:.1f} s of CPU"
        err = capsys.readouterr().err
        assert err.startswith(f"{path}:{where}{':' if where else ''} error: "), err
        assert message in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing is written"
    return err


def accepted(tmp_path: Path, capsys, content: str, name: str = "s.lsm") -> lmoec.Program:
    """`check` and `compile` both accept it, and every LSM's layer runs forward with a finite result."""
    path = write(tmp_path, content, name)
    assert main(["check", str(path)]) == 0
    assert main(["compile", str(path), "-o", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    program = lmoec.compile_spec(path)
    for lsm in program.ir.lsms:
        y = program.layer(lsm, hidden=16, heads=2)(torch.randn(2, 21, 16), backend="torch")
        assert y.shape == (2, 21, 16) and torch.isfinite(y).all()
    return program


# ---- crashes: nesting that overflowed Python's recursion limit ----------------------------------


@pytest.mark.parametrize("value,col", [
    ("- " * 2000 + "1", 93),  # 2000 unary minuses: the 41st is too deep
    (" + ".join(["1"] * 20000), 13),  # a 20,000-term sum nests one level per +
    (" ** ".join(["2"] * 3000), 208),
    ("(" * 5000 + "1" + ")" * 5000, None),  # parentheses are not levels: accepted
])
def test_deep_scale_expressions(tmp_path, capsys, value, col):
    if col is None:
        accepted(tmp_path, capsys, LSM.format(f"scale = {value}"))
    else:
        rejected(tmp_path, capsys, LSM.format(f"scale = {value}"), f"2:{col}", "expression nests more than 40 levels deep")


@pytest.mark.parametrize("value,col", [
    ("abs(" * 1500 + "x @ W" + ")" * 1500, 180),
    ("(x @ W)" + " @ W" * 3000, 20),
])
def test_deep_gate_expressions(tmp_path, capsys, value, col):
    rejected(tmp_path, capsys, LSM.format(f"decay scalar = {value}"), f"2:{col}", "expression nests more than 40 levels deep")


def test_deeply_nested_blocks(tmp_path, capsys):
    text = "model m {\n    " + "moe { " * 1000 + "}" * 1000 + "\n}\n"
    rejected(tmp_path, capsys, text, "2:53", "blocks nest more than 8 deep")


def test_the_deepest_accepted_expression_compiles_dumps_and_runs(tmp_path, capsys):
    """40 levels (the limit) of every kind of node: sympy, the IR dump (pydantic's depth limit), the printer and
    Python compiling the emitted code (at most 200 nested parentheses) all take it."""
    gate = "sigmoid(" * 13 + "abs(" * 13 + "-" * 12 + "x @ W" + ")" * 26
    scale = "sqrt(" * 12 + "abs(" * 12 + "(" * 12 + "1 + 2 ** -1" + ")" * 36 + " * " + "- " * 12 + "exp(K)"
    program = accepted(tmp_path, capsys, f"lsm a {{\n    output_gate = {gate}\n    scale = {scale}\n}}\n")
    assert main(["inspect", str(tmp_path / "s.lsm"), "--ir"]) == 0
    assert '"output_gate"' in capsys.readouterr().out
    assert program.ir.dump()


# ---- crashes: statements in the wrong place, sizes beyond memory --------------------------------


@pytest.mark.parametrize("stmt,col,where", [
    ("ffn { ffn = 64 } param p[H] = 1", 28, "model 'm'"),
    ("ffn { ffn = 64 } attention { param p[H] = 1 }", 40, "model 'm' attention"),
    ("moe { experts = 4 top_k = 2 expert_ffn = 8 param p[H] = 1 }", 54, "model 'm' moe"),
])
def test_param_outside_an_lsm_block(tmp_path, capsys, stmt, col, where):
    rejected(tmp_path, capsys, MODEL.format(stmt, gla=GLA), f"4:{col}", f"{where}: 'param p[...]' belongs in an lsm block")


@pytest.mark.parametrize("pattern,col", [
    ('"LLLN" * 99999999999999999999999999', 24),  # OverflowError
    ('"L" * 99999999999', 21),  # MemoryError
    ('"LLLN" * 1000000000', 24),  # a hang
    ('"L" * 1000 + "N" * 25', 15),
])
def test_huge_patterns(tmp_path, capsys, pattern, col):
    text = f"model m {{\n    vocab = 256 hidden = 64 heads = 4 ffn {{ ffn = 64 }}\n    pattern = {pattern}\n}}\n"
    rejected(tmp_path, capsys, text, f"3:{col}", "the pattern would have more than 1024 layers")


def test_huge_layer_count(tmp_path, capsys):
    text = "model m {\n    vocab = 256 hidden = 64 heads = 4 ffn { ffn = 64 }\n    layers = 99999999999\n}\n"
    rejected(tmp_path, capsys, text, "3:14", "'layers' = 99999999999 is out of range")
    rejected(tmp_path, capsys, text.replace("99999999999", "2000000"), "3:5", "layers = 2000000 is more than 1024")


def test_names_that_make_bad_file_names(tmp_path, capsys):
    rejected(tmp_path, capsys, "lsm " + "a" * 300 + " {\n    scale = 1\n}\n", "1:1", "is longer than 64 characters")


@pytest.mark.parametrize("name,problem", [
    ("class", "is a Python keyword"), ("forward", "is reserved"), ("q_proj", "is reserved"), ("norm_gate", "is reserved"),
    ("_buffers", "is reserved"), ("training", "is reserved"),
])
def test_names_the_layer_module_cannot_take(tmp_path, capsys, name, problem):
    rejected(tmp_path, capsys, LSM.format(f"param {name}[H] = 0"), "2:11", f"param name '{name}' {problem}")
    rejected(tmp_path, capsys, LSM.format(f"output_gate = sigmoid(x @ {name})"), "2:5",
             f"projection weight name '{name}' {problem}")


def test_keyword_lsm_names_are_fine(tmp_path, capsys):
    """A keyword names files (`class_layer.py`) and modules, never a Python identifier."""
    accepted(tmp_path, capsys, "lsm class {\n    decay scalar = logsigmoid(x @ W)\n}\nlsm None {\n    scale = 1\n}\n")


def test_reserved_names_cover_the_layer_and_torch():
    """Params and weights become `self.NAME` of the emitted layer: no name it or nn.Module already uses."""
    template = (TEMPLATES / "modules" / "layer.py.j2").read_text()
    own = set(re.findall(r"self\.([A-Za-z_]\w*)", template)) | set(re.findall(r"\n    def ([A-Za-z_]\w*)", template))
    assert {n for n in own if not n.startswith("_")} - {"chain", "conv", "kernel"} <= RESERVED_NAMES  # ShortConv's own
    public = {n for n in set(dir(torch.nn.Module)) | set(vars(torch.nn.Module())) if not n.startswith("_")}
    assert public <= MODULE_NAMES, sorted(public - MODULE_NAMES)


# ---- hangs: exact big-number arithmetic ------------------------------------------------------------


@pytest.mark.parametrize("stmt,col,message", [
    ("scale = 9 ** 9 ** 9", 13, "constant out of range"),
    ("param p[H] = " + "2 ** " * 7 + "0", 23, "constant out of range"),  # the second power is 2 ** 65536
    ("param p[H] = (2 * h) ** 999999999", 18, "constant factor out of range: 2 ** 999999999"),
    ("scale = 2 ** 100000", 13, "constant out of range"),  # also past Python's int-to-string digit limit
    ("scale = 1" + "0" * 5000, 13, "number out of range"),
    ("update { gradient = minibatch(" + "9" * 5000 + ") lr = sigmoid(x @ W_lr) }", 35, "minibatch(N) takes a whole N"),
])
def test_big_numbers(tmp_path, capsys, stmt, col, message):
    rejected(tmp_path, capsys, LSM.format(stmt), f"2:{col}", message)


# ---- check said ok, compile failed -------------------------------------------------------------------


@pytest.mark.parametrize("stmts,where,message", [
    (["expand_k = 0.125", "feature_map q = rebased"], "3:5", "q and k need one feature width"),
    (["scale = 1e309"], "2:13", "number out of range"),
    (["param big[hidden] = h"], "2:11", "the init reads the head index h, but the param has no H dimension"),
    (["param big[H] = i"], "2:11", "the init reads the index i, but the param has no K, V or hidden dimension"),
    (["decay scalar = x @ W @ W"], "2:5", "projection weight 'W' is used with two shapes: hidden -> H in decay scalar and H -> H"),
    (["decay scalar = logsigmoid(x @ W_og)", "output_gate = swish(x @ W_og)"], "3:5",
     "'W_og' is used with two shapes: hidden -> H in decay scalar and hidden -> H*V in output_gate"),
    (["feature_map = silu", "decay vector = logsigmoid(x @ W)", "tie k = 1 - exp(g)"], "2:5", "it takes no feature map"),
    (["scale = 2 ** 100000"], "2:13", "constant out of range"),
    (["decay scalar = logsigmoid(tanh(x @ W1[8] + x) @ W2)"], "2:5", "a projection's input mixes widths 8 and hidden"),
    (["dplr a = sigmoid(q @ W)", "dplr b = k"], "2:5", "a projection's input may read x and other projections, not 'q'"),
])
def test_check_finds_what_compile_finds(tmp_path, capsys, stmts, where, message):
    rejected(tmp_path, capsys, "lsm a {\n" + "".join(f"    {s}\n" for s in stmts) + "}\n", where, message)


# ---- check and compile said ok, the model crashed at run time ------------------------------------------


@pytest.mark.parametrize("stmts", [
    ["output_norm = rmsnorm", "output_gate = 2"],  # a number as the gate, through the norm's recompute
    ["output_norm = groupnorm", "param p[H] = h", "output_gate = sigmoid(p) * 2"],  # per head only
    ["delta beta = 100"],  # a constant beta, broadcast to [B, T, H]
    ["param b[H] = 0", "delta beta = sigmoid(b)"],  # a learned per-head beta
    ["dplr a = -0.5 * k", "dplr b = k"],
    ["decay vector = logsigmoid(sigmoid(x @ W1) @ W2)"],  # a projection of a projection through a function
    ["param A[H] = h + 1", "decay vector = -A * sigmoid(x @ W)"],  # a per-head param in a per-key slot
    ["decay scalar = logsigmoid(x @ W / 10**30)"],  # past int64: folded to a float
    # the compiler bounds a DPLR decay to pick its backend: 1e-30 ** -20 overflows a float there (a traceback once)
    ["decay vector = -(sigmoid(x @ W_d) + 1e-30) ** -20", "dplr a = -0.5 * k", "dplr b = k"],
])
def test_accepted_specs_run(tmp_path, capsys, stmts):
    accepted(tmp_path, capsys, "lsm a {\n" + "".join(f"    {s}\n" for s in stmts) + "}\n")


@pytest.mark.parametrize("stmt,where,message", [
    ("scale = (-1) ** 0.5", "2:13", "not a real number"),
    ("decay scalar = logsigmoid(x @ W) * (-8) ** (1/3)", "2:40", "not a real number"),
    ("param p[H] = sqrt(-2)", "2:18", "sqrt(-2) is not a real number"),
    ("scale = log(-1)", "2:13", "log(-1) is not a real number"),
    ("decay vector = x", "2:5", "decay vector is a [B, T, hidden] tensor, but it needs [B, T, H, K]"),
    ("decay scalar = logsigmoid(x @ W[16])", "2:5", "decay scalar is a [B, T, 16] tensor, but it needs [B, T, H]"),
    ("dplr a = v", "2:5", "dplr a"),  # expand_v differs from expand_k below
    ("decay scalar = logsigmoid(x @ W) - exp(1000)", "2:40", "constant out of range"),
    ("decay scalar = logsigmoid(x @ W) / 10**100", "2:40", "constant out of range"),
    ("decay scalar = logsigmoid(2 * x @ W * 1e38 * 10)", "2:20", "constant out of range after folding"),
    ("decay scalar = logsigmoid(x @ W) / 0", "2:20", "division by zero"),
])
def test_specs_that_crashed_at_run_time(tmp_path, capsys, stmt, where, message):
    extra = "\n    expand_v = 2\n    dplr b = k" if stmt.startswith("dplr") else ""
    rejected(tmp_path, capsys, LSM.format(stmt + extra), where, message)


# ---- messages without a place ----------------------------------------------------------------------


def test_not_utf8(tmp_path, capsys):
    err = rejected(tmp_path, capsys, b"lsm a {\n    scale = 1 # caf\xe9\n}\n", "2:20", "the file is not UTF-8 text: byte 0xe9")
    assert "caf\ufffd" in err  # the line, shown as far as it decodes


def test_not_utf8_in_an_import(tmp_path, capsys):
    """The place is the byte in the imported file."""
    bad = write(tmp_path, b"lsm b {\n    \xff\n}\n", "bad.lsm")
    path = write(tmp_path, 'import "bad.lsm"\nlsm a {\n    scale = 1\n}\n')
    assert main(["check", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"{bad}:2:5: error: the file is not UTF-8 text: byte 0xff")


def test_nul_in_an_import_path(tmp_path, capsys):
    rejected(tmp_path, capsys, 'import "a\x00b.lsm"\n', "1:8", "the path contains a NUL byte")


@pytest.mark.parametrize("target,message", [
    (".", "is a directory, not a spec file"),
    ("x" * 300 + ".lsm", "bad path"),
    ("/dev/null", "not a regular file"),
])
def test_odd_imports(tmp_path, capsys, target, message):
    rejected(tmp_path, capsys, f'import "{target}"\n', "1:8", message)


def test_a_directory_as_the_spec(tmp_path, capsys):
    (tmp_path / "d.lsm").mkdir()
    for argv in (["check", str(tmp_path / "d.lsm")], ["compile", str(tmp_path / "d.lsm"), "-o", str(tmp_path / "o")]):
        assert main(argv) == 2
        assert capsys.readouterr().err == f"{tmp_path / 'd.lsm'}: error: is a directory, not a file\n"
    assert not (tmp_path / "o").exists()
    with pytest.raises(SpecError, match="is a directory, not a spec file"):  # the API says so too
        lmoec.compile_spec(tmp_path / "d.lsm")


def test_a_model_with_neither_layers_nor_pattern(tmp_path, capsys):
    text = "model m {\n    vocab = 256 hidden = 64 heads = 4 ffn { ffn = 64 }\n}\n"
    err = rejected(tmp_path, capsys, text, "1:1", "model 'm': missing layers = N or pattern = \"...\"")
    assert "pydantic" not in err and len(err.splitlines()) == 3


def test_a_model_with_heads_none(tmp_path, capsys):
    """Not pydantic's dump of a None where an int belongs: the model's heads can't be none (attention's can)."""
    text = "model m {\n    vocab = 256 hidden = 64 ffn { ffn = 64 }\n    heads = none layers = 2\n}\n"
    rejected(tmp_path, capsys, text, "3:13", "model 'm': 'heads' expects an integer")


def test_windows_line_ends_and_a_bom(tmp_path, capsys):
    text = "\ufeff# doc\r\nlsm a {\r\n    decay scalar = logsigmoid(x @ W)\r\n    scale = 1 2\r\n}\r\n"
    rejected(tmp_path, capsys, text.encode(), "4:15", "syntax error")
    program = accepted(tmp_path, capsys, text.replace(" 2\r", "\r"))
    assert program.ir.lsms["a"].doc == "doc"


def test_long_lines_are_shown_around_the_column(tmp_path, capsys):
    values = ", ".join(["identity"] * 30 + ["nope"] + ["identity"] * 30)
    err = rejected(tmp_path, capsys, LSM.format(f"feature_map = {values}"), "2:319", "unknown feature map 'nope'")
    _, line, caret = err.splitlines()
    assert len(line) < 120 and line[caret.index("^"):].startswith("nope")


def test_in_a_fresh_process_no_traceback(tmp_path):
    """The command itself (not only main()): exit 2 and one message for a crash that was a RecursionError."""
    path = write(tmp_path, LSM.format("scale = " + "- " * 5000 + "1"))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "lmoec", "check", str(path)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"{path}:2:93: error: expression nests more than 40 levels deep")
