"""Mutation fuzzing of the spec library: mutators, and worker processes that run each mutant.

A mutant is a library spec changed by one to three seeded mutations (lines dropped, swapped or
duplicated; tokens inserted, deleted or replaced; numbers made extreme; deep nesting; bytes that
are not UTF-8; odd imports; identifiers renamed to keywords, reserved or overlong names; hostile
doc comments). `mutant(seed, index)` is a pure function of its arguments, so a failure reported
as (seed, index) reproduces with `python tests/fuzz_lsm.py SEED INDEX`.

Each mutant runs in a worker process (`python tests/fuzz_lsm.py --worker`, JSON lines on stdin and
stdout), so a case that hangs inside C code (an exact big-integer power) is killed by the parent
and reported as hung instead of stopping the suite. A worker runs `check` and `compile` (the
functions behind the two commands), parses every emitted .py file, and for a sample of the
accepted mutants builds each LSM's layer and op at tiny sizes and runs them forward on CPU.
"""
from __future__ import annotations

import base64
import json
import os
import random
import re
import selectors
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SPECS = sorted(p.relative_to(ROOT / "specs").as_posix() for p in (ROOT / "specs").rglob("*.lsm")
               if not p.name.startswith("fuzz_"))  # not the cases this module writes to reproduce

# ---- mutators ---------------------------------------------------------------------------

_TOKEN = re.compile(r'#[^\n]*|"[^"\n]*"|[0-9]+\.?[0-9]*(?:[eE][+-]?[0-9]+)?|\.[0-9]+|[A-Za-z_][A-Za-z0-9_]*|\*\*|\s+|\S')
_WORDS = ("lsm model parallel import extends param decay delta dplr bonus tie feature_map heads expand_k "
          "expand_v short_conv output_norm output_gate scale chunk_size vocab hidden layers pattern attention "
          "moe ffn norm experts top_k expert_ffn kv_heads window none true false constant scalar vector beta "
          "a b u k q v x h H K V i layer g W W2 sigmoid logsigmoid softplus exp log abs sqrt min max l2norm "
          "taylor2 rebased silu elu_p1 rmsnorm groupnorm").split()
_PUNCT = ["{", "}", "[", "]", "(", ")", "=", ",", "+", "-", "*", "/", "**", "@", '"L"', '"LLLN"', '"../lsm/gla.lsm"']
_NUMBERS = ["0", "1", "2", "16", "64", "0.5", "1e-6", "3"]
EXTREME_NUMBERS = ["0", "0.0", "00", "1e38", "3.4e38", "3.5e38", "1e39", "1e309", "1e-320", "1e-45", "0.1", "7",
                   "99999999999999999999", "18446744073709551616", "2147483647", "2147483648", "9" * 5000,
                   "1024", "1025", "65", "0.3", "4300", "1" + "0" * 39, "1e-7", "255", "17", "1e5"]
ODD_NAMES = ["class", "None", "lambda", "def", "if", "match", "forward", "training", "q_proj", "norm_gate",
             "_x", "__init__", "cuda", "n" * 300, "x", "h", "K", "exp", "i", "reset_parameters", "A1"]
ODD_IMPORTS = ["nope.lsm", ".", "..", "/", "/dev/null", "/dev/zero", "a\x00b.lsm", "x" * 300 + ".lsm", "",
               "../lsm", "../lsm/gla.lsm", "../models/tiny.lsm", "../lsm/rwkv7.lsm", "SELF", "../../specs/lsm/bla.lsm",
               "\u2028.lsm", "../lsm/gla.lsm\\"]
HOSTILE_DOCS = ['"""', "'''", "\\", "\\x00", "\x00", "\u2028", "\u2029", "\x0b", "\x0c", "\x85", "{{ ctx }}",
                "{% raw %}", "\t", "\\N{", "\x1b[31m", '" + __import__("os").system("x") + "', "\ufeff", "\ud7ff",
                "#", "\\u2028", "''' \"\"\" \\"]
WRAPS = ["-", "abs(", "sigmoid(", "(", "exp(", "log(", "sqrt("]


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def _solid(tokens: list[str]) -> list[int]:
    return [i for i, t in enumerate(tokens) if not t.isspace() and not t.startswith("#")]


def _lines(rng, text: str) -> str:
    lines = text.split("\n")
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    how = rng.choice(["drop", "swap", "dup"])
    if how == "drop":
        del lines[i]
    elif how == "swap":
        lines[i], lines[j] = lines[j], lines[i]
    else:
        lines.insert(j, lines[i])
    return "\n".join(lines)


def _token(rng, text: str) -> str:
    tokens = _tokens(text)
    solid = _solid(tokens)
    if not solid:
        return text
    i = rng.choice(solid)
    how = rng.choice(["insert", "delete", "replace", "replace_same"])
    new = rng.choice([rng.choice(_WORDS), rng.choice(_PUNCT), rng.choice(_NUMBERS)])
    if how == "insert":
        tokens.insert(i, new + " ")
    elif how == "delete":
        del tokens[i]
    elif how == "replace":
        tokens[i] = new
    else:
        tokens[i] = tokens[rng.choice(solid)]
    return "".join(tokens)


def _number(rng, text: str) -> str:
    tokens = _tokens(text)
    numbers = [i for i, t in enumerate(tokens) if t[0].isdigit() or t[0] == "."]
    if not numbers:
        return text
    tokens[rng.choice(numbers)] = rng.choice(EXTREME_NUMBERS)
    return "".join(tokens)


def _nesting(rng, text: str) -> str:
    depth = rng.choice([rng.randint(1, 45), rng.randint(1000, 3000)])
    lines = text.split("\n")
    exprs = [i for i, line in enumerate(lines) if re.search(r"\b(decay \w+|delta beta|dplr [ab]|output_gate|scale|param [^=]+)=", line)]
    how = rng.choice(["wrap", "sum", "pow", "matmul", "blocks"])
    if how == "blocks" or not exprs:
        i = max(0, len(lines) - 2)
        lines.insert(i, "    " + "moe { " * depth + "}" * depth)
        return "\n".join(lines)
    i = rng.choice(exprs)
    key, value = lines[i].split("=", 1)
    if how == "wrap":
        w = rng.choice(WRAPS)
        close = ")" if w.endswith("(") else ""
        value = " " + (w + " ") * depth + value.strip() + close * depth
    elif how == "sum":
        value = value + " + 1" * depth
    elif how == "pow":
        value = " " + "2 ** " * depth + "(" + value.strip() + ")"
    else:
        value = " (x @ W_n)" + " @ W_n" * depth
    lines[i] = key + "=" + value
    return "\n".join(lines)


def _identifier(rng, text: str) -> str:
    tokens = _tokens(text)
    names = sorted({t for t in tokens if t[0].isalpha() or t[0] == "_"})
    if not names:
        return text
    old, new = rng.choice(names), rng.choice(ODD_NAMES)
    every = rng.random() < 0.5
    out, done = [], False
    for t in tokens:
        if t == old and (every or not done):
            out.append(new)
            done = True
        else:
            out.append(t)
    return "".join(out)


def _import(rng, text: str, self_name: str) -> str:
    path = rng.choice(ODD_IMPORTS)
    path = self_name if path == "SELF" else path
    line = f'import "{path}"'
    return line + "\n" + text if rng.random() < 0.5 else text + "\n" + line + "\n"


def _doc(rng, text: str) -> str:
    """A hostile comment line directly above a block: it becomes that block's doc, copied into generated code."""
    lines = text.split("\n")
    heads = [i for i, line in enumerate(lines) if re.match(r"\s*(lsm|model)\b", line)] or [0]
    i = rng.choice(heads)
    bits = "".join(rng.choice(HOSTILE_DOCS) for _ in range(rng.randint(1, 4)))
    lines.insert(i, f"# doc {bits} end")
    return "\n".join(lines)


TEXT_MUTATORS = {"lines": _lines, "token": _token, "number": _number, "nesting": _nesting, "identifier": _identifier,
                 "doc": _doc}


def _bytes(rng, data: bytes) -> bytes:
    how = rng.choice(["invalid", "bom", "crlf", "cr", "nul"])
    if how == "bom":
        return b"\xef\xbb\xbf" + data
    if how == "crlf":
        return data.replace(b"\n", b"\r\n")
    if how == "cr":
        return data.replace(b"\n", b"\r")
    at = rng.randrange(len(data) + 1)
    junk = b"\x00" if how == "nul" else rng.choice([b"\xff", b"\xc3", b"\xe2\x80", b"\x80", b"\xed\xa0\x80", b"\xf8"])
    return data[:at] + junk + data[at:]


@dataclass
class Mutant:
    seed: int
    index: int
    spec: str  # library spec it came from, relative to specs/
    mutations: list[str]
    data: bytes

    @property
    def name(self) -> str:
        return f"m{self.index}_{Path(self.spec).stem.replace('.', '_').replace('-', '_')}"


def mutant(seed: int, index: int, docs: bool = False) -> Mutant:
    """The index-th mutant of a seed; docs=True: one hostile doc comment, nothing else."""
    rng = random.Random(f"{seed}:{index}:{docs}")
    spec = SPECS[index % len(SPECS)]
    data = (ROOT / "specs" / spec).read_bytes()
    if docs:
        return Mutant(seed, index, spec, ["doc"], _doc(rng, data.decode()).encode("utf-8", "surrogatepass"))
    names = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        kind = rng.choice(list(TEXT_MUTATORS) + ["bytes", "import"])
        names.append(kind)
        if kind == "bytes":
            data = _bytes(rng, data)
            continue
        text = data.decode("utf-8", "surrogateescape")
        text = _import(rng, text, Path(spec).name) if kind == "import" else TEXT_MUTATORS[kind](rng, text)
        data = text.encode("utf-8", "surrogateescape")
    return Mutant(seed, index, spec, names, data)


# ---- one case, in a worker ----------------------------------------------------------------

SLOW_S = 2.0  # no check or compile of a mutant may take more CPU time


def _tiny_shape(lsm):
    """(hidden, heads) of a small layer of `lsm`: head dims 2..32, or None if the spec allows none."""
    heads = lsm.heads or max(2, lsm.groups or 1)  # a layer's heads must be a multiple of the spec's groups
    if lsm.groups and heads % lsm.groups:
        return None
    if heads > 8:
        return None
    for hidden in range(heads, 513, heads):
        dims = []
        for expand in (lsm.expand_k, lsm.expand_v):
            width = hidden * expand
            if not width.is_integer() or int(width) % heads:
                break
            dims.append(int(width) // heads)
        if len(dims) == 2 and all(2 <= d <= 32 for d in dims):
            return hidden, heads
    return None


def _finite(*tensors) -> bool:
    import torch

    return all(torch.isfinite(t).all() for t in tensors if isinstance(t, torch.Tensor))


def _forward(program) -> dict:
    """Each LSM's op (on the contract's well-conditioned inputs) and layer forward on CPU.

    The op and the code around it are the compiler's: with finite inputs to the op in the stable region
    (log decay g <= 0, moderate magnitudes) its output is finite, and a finite op output through the output
    norm and projection stays finite. A non-finite value that starts in the spec's own arithmetic (a gate
    that overflows, params initialized to inf, a growing decay) is the spec's, and is counted, not failed.
    """
    import torch
    from conftest import random_inputs

    out = {"layers": 0, "spec_nonfinite": 0, "no_tiny_shape": 0}
    for name, lsm in program.ir.lsms.items():
        rec = lsm.recurrence
        gen = torch.Generator().manual_seed(0)
        inputs = random_inputs(rec, dtype=torch.float32, generator=gen)
        o, state = program.op(name)(**inputs, output_final_state=True, backend="torch")
        if not _finite(o, state):
            raise AssertionError(f"op of lsm {name} ({rec.key}) is not finite on well-conditioned inputs")
        shape = _tiny_shape(lsm)
        if shape is None:
            out["no_tiny_shape"] += 1
            continue
        layer = program.layer(name, hidden=shape[0], heads=shape[1], layers=2)  # a spec may read `layers`
        module, seen = sys.modules[type(layer).__module__], {}
        op = module.op

        def spy(*args, **kwargs):
            seen["args"], seen["kwargs"] = args, kwargs
            seen["output"] = op(*args, **kwargs)
            return seen["output"]

        hook = layer.o_proj.register_forward_pre_hook(lambda mod, args: seen.__setitem__("o", args[0]))
        module.op = spy
        try:
            y = layer(torch.randn(2, 37, shape[0], generator=gen), backend="torch")
        finally:
            module.op = op
            hook.remove()
        out["layers"] += 1
        if _finite(y):
            continue
        tensors = [t for t in (*seen["args"], *seen["kwargs"].values()) if isinstance(t, torch.Tensor)]
        g, o_op, o_in = seen["kwargs"].get("g"), seen["output"][0], seen["o"]
        stable = (_finite(*tensors, *layer.parameters()) and all(t.abs().max() <= 1e4 for t in tensors if t.numel())
                  and (g is None or (g <= 0).all()))
        if stable and not _finite(o_op):
            raise AssertionError(f"layer {name}: the op's output is not finite for finite, stable inputs")
        if _finite(o_op) and _finite(o_in) and o_in.abs().max() <= 1e30:
            raise AssertionError(f"layer {name}: finite input to the output projection, non-finite output")
        if _finite(o_op) and not _finite(o_in) and lsm.output_gate is None:
            raise AssertionError(f"layer {name}: the output norm of a finite op output is not finite")
        out["spec_nonfinite"] += 1
        out.setdefault("why", []).append(
            "params" if not _finite(*layer.parameters()) else "op inputs" if not _finite(*tensors)
            else "growing decay" if g is not None and (g > 0).any() else "large op inputs" if not stable
            else "gate" if not _finite(o_in) else "output projection of values > 1e30")
    return out


def run_case(workdir: Path, name: str, spec: str, data: bytes, forward: bool) -> dict:
    """Check and compile one mutant, parse what compile emits, and (if forward) run its ops and layers."""
    import ast

    from lmoec.errors import SpecError
    from lmoec.program import check_spec, compile_spec

    path = workdir / Path(spec).parent / f"{name}.lsm"
    path.write_bytes(data)
    result: dict = {}
    try:
        verdicts = []
        for what, run in (("check", check_spec), ("compile", compile_spec)):
            start = time.process_time()  # CPU time: on a shared machine wall time measures the neighbours
            try:
                program = run(path)
                files = program.files
                verdicts.append(("ok", None))
            except SpecError as err:
                verdicts.append(("rejected", str(err)))
            result[f"{what}_s"] = time.process_time() - start
        result["outcome"] = verdicts[1][0]
        if verdicts[0] != verdicts[1]:
            result["problem"] = f"check and compile disagree: {verdicts[0]} vs {verdicts[1]}"
        elif verdicts[1][0] == "rejected" and "error:" not in verdicts[1][1]:
            result["problem"] = f"a diagnostic without 'error:': {verdicts[1][1]}"
        elif verdicts[1][0] == "ok":
            for file, text in files.items():
                if file.endswith(".py"):
                    try:
                        ast.parse(text)
                    except (SyntaxError, ValueError) as err:
                        result["problem"] = f"emitted {file} does not parse: {err}"
            if forward and "problem" not in result:
                result["forward"] = _forward(program)
        else:
            result["message"] = verdicts[1][1].split("\n")[0][-300:]
    except BaseException as err:  # noqa: BLE001 - a crash is what this looks for
        result["outcome"] = "crashed"
        result["problem"] = "".join(traceback.format_exception_only(type(err), err)).strip()[-2000:]
        result["traceback"] = traceback.format_exc()[-4000:]
    finally:
        path.unlink(missing_ok=True)
    return result


def _worker() -> None:
    """Serve cases: one JSON line in (name, spec, base64 data, forward), one JSON line out."""
    import torch

    torch.set_num_threads(1)
    sys.setrecursionlimit(1000)  # as in a plain `lmoec` run: pytest's own setting must not hide a RecursionError
    workdir = Path(os.environ["LMOEC_FUZZ_WORKDIR"])
    for line in sys.stdin:
        case = json.loads(line)
        result = run_case(workdir, case["name"], case["spec"], base64.b64decode(case["data"]), case["forward"])
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


# ---- running many cases -------------------------------------------------------------------

HANG_S = 20.0  # a worker silent this long on one case is killed and the case reported as hung


class Pool:
    """Worker processes fed one case at a time; a worker that hangs is killed and replaced."""

    def __init__(self, workers: int, workdir: Path, cache: Path):
        self.env = {**os.environ, "LMOEC_FUZZ_WORKDIR": str(workdir), "LMOEC_CACHE": str(cache),
                    "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])}
        self.procs = [self._start() for _ in range(workers)]

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(Path(__file__)), "--worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self.env, text=True, cwd=ROOT)

    def run(self, cases: list[tuple[Mutant, bool]]) -> list[dict]:
        results: list = [None] * len(cases)
        todo = list(range(len(cases)))[::-1]
        busy: dict[int, tuple[int, float]] = {}  # worker -> (case, started)
        sel = selectors.DefaultSelector()
        for w, p in enumerate(self.procs):
            sel.register(p.stdout, selectors.EVENT_READ, w)
        while todo or busy:
            for w, p in enumerate(self.procs):
                if w not in busy and todo:
                    i = todo.pop()
                    m, forward = cases[i]
                    p.stdin.write(json.dumps({"name": m.name, "spec": m.spec, "forward": forward,
                                              "data": base64.b64encode(m.data).decode()}) + "\n")
                    p.stdin.flush()
                    busy[w] = (i, time.monotonic())
            for key, _ in sel.select(timeout=0.5):
                w = key.data
                line = self.procs[w].stdout.readline()
                i, _ = busy.pop(w)
                results[i] = json.loads(line) if line else {"outcome": "crashed", "problem": "the worker died"}
                if not line:
                    self._replace(sel, w)
            for w, (i, started) in list(busy.items()):
                if time.monotonic() - started > HANG_S:
                    results[i] = {"outcome": "hung", "problem": f"no result after {HANG_S:.0f} s"}
                    busy.pop(w)
                    self._replace(sel, w)
        return results

    def _replace(self, sel, w: int) -> None:
        old = self.procs[w]
        sel.unregister(old.stdout)
        old.kill()
        old.wait()
        self.procs[w] = self._start()
        sel.register(self.procs[w].stdout, selectors.EVENT_READ, w)

    def close(self) -> None:
        for p in self.procs:
            p.stdin.close()
            p.wait(timeout=30)


def summarize(cases: list[tuple[Mutant, bool]], results: list[dict]) -> dict:
    totals = {"mutants": len(cases), "accepted": 0, "rejected": 0, "crashed": 0, "hung": 0, "slow": 0,
              "problems": 0, "forward_runs": 0, "layers_run": 0, "spec_nonfinite": 0, "no_tiny_shape": 0,
              "max_check_s": 0.0, "max_compile_s": 0.0}
    for r in results:
        totals[{"ok": "accepted"}.get(r["outcome"], r["outcome"])] += 1
        for what in ("check", "compile"):
            totals[f"max_{what}_s"] = max(totals[f"max_{what}_s"], r.get(f"{what}_s", 0.0))
        if max(r.get("check_s", 0), r.get("compile_s", 0)) > SLOW_S:
            totals["slow"] += 1
        totals["problems"] += "problem" in r
        if "forward" in r:
            totals["forward_runs"] += 1
            totals["layers_run"] += r["forward"]["layers"]
            totals["spec_nonfinite"] += r["forward"]["spec_nonfinite"]
            totals["no_tiny_shape"] += r["forward"]["no_tiny_shape"]
    return totals


def failures(cases: list[tuple[Mutant, bool]], results: list[dict]) -> list[str]:
    out = []
    for (m, _), r in zip(cases, results):
        slow = max(r.get("check_s", 0), r.get("compile_s", 0)) > SLOW_S
        if "problem" in r or slow:
            what = r.get("problem") or f"took {max(r['check_s'], r['compile_s']):.2f} s"
            out.append(f"seed {m.seed} index {m.index} ({m.spec}, {'+'.join(m.mutations)}): {what}")
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker()
    else:  # write one case beside its library spec (so its imports resolve): python tests/fuzz_lsm.py SEED INDEX [docs]
        m = mutant(int(sys.argv[1]), int(sys.argv[2]), docs=sys.argv[3:] == ["docs"])
        out = ROOT / "specs" / Path(m.spec).parent / f"fuzz_{m.seed}_{m.index}.lsm"
        out.write_bytes(m.data)
        print(f"{m.spec} + {'+'.join(m.mutations)}: lmoec check {out.relative_to(ROOT)}   (then delete it)")
