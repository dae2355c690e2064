"""Ablation grids: one derived spec per point, written as overrides of a base model spec.

Each variant file imports the base spec and `extends` its lsm and model, so a
variant states only what differs, and the base stays the single source of
truth. Every point is compiled before it is written; points the compiler
rejects are reported with its message and not written.

Axes (`--vary AXIS=v1,v2,...`):
    lsm       swap the recurrence for a library one (specs/lsm/<name>.lsm) or a path
    decay     none | constant | scalar | vector | outer_sum | outer_product, with the standard gate of that kind
              (outer_sum: GFW's key and value gates; outer_product: Mamba's selective-scan gate exp(dt A))
    delta     off | on (the delta rule with beta = sigmoid(x @ W_beta))
    momentum  off | on: a test-time-training update's momentum (none, or sigmoid(x @ W_eta)); the lsm needs an update
    minibatch 1 | N: the update's gradient point (1: every token; N: the start of each mini-batch of N tokens)
    pattern   the layer pattern, e.g. LLLL, LLLN (must keep the layer count)
    lsm.KEY / model.KEY   any other key of the lsm or model block, written as is
    lsm.BLOCK.KEY / model.BLOCK.KEY   a key of a sub-block (lsm.memories.count, model.moe.top_k),
              merged over the base's block; several axes of one block share one `BLOCK { ... }`
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import SpecError
from .frontend import load_spec
from .ir.graph import param_counts
from .output import check_target, write_files
from .paths import SPECS
from .passes import run_passes

# The gate each decay kind gets when a variant switches to it: the library's usual forms, each after
# `decay = none` (a base's element-wise parts would otherwise stay beside the new gate).
DECAY_GATES = {
    "none": [],
    "constant": ["decay constant = log(1 - 2 ** (-5 - h))"],  # RetNet's per-head gammas
    "scalar": ["decay scalar = logsigmoid(x @ W_gs) / 16"],  # simple GLA / GateLoop style
    "vector": ["decay vector = logsigmoid(x @ W_gv[16] @ W_gv2) / 16"],  # GLA's low-rank gate
    "outer_sum": ["decay vector = logsigmoid(x @ W_gk[16] @ W_gk2) / 16",  # GFW (specs/lsm/gfw.lsm)
                  "decay value = logsigmoid(x @ W_gvv[16] @ W_gvv2) / 16"],
    "outer_product": ["param A_log[H, V, K] = log(i + 1)",  # Mamba's selective scan (specs/lsm/mamba.lsm)
                      "param dt_bias[H, V] = log(exp(0.001 * 100 ** ((h * V + i) / (H * V))) - 1)",
                      "decay step = softplus(x @ W_dt[16] @ W_dt2 + dt_bias)",
                      "decay rate = -exp(A_log)"],
}
DELTA_RULES = {"off": "delta = none", "on": "delta beta = sigmoid(x @ W_beta)"}
MOMENTUM = {"off": "momentum = none", "on": "momentum = sigmoid(x @ W_eta)"}  # inside the lsm's update { }
KEY = re.compile(r"^(lsm|model)\.(?:([A-Za-z_][A-Za-z0-9_]*)\.)?([A-Za-z_][A-Za-z0-9_]*)$")
WRITTEN_BY = "# Written by `lmoec variants`"  # the second line of every variant spec


@dataclass(frozen=True)
class Variant:
    name: str
    point: dict[str, str]
    text: str


@dataclass(frozen=True)
class Rejected:
    point: dict[str, str]
    reason: str


def parse_axes(specs: list[str]) -> dict[str, list[str]]:
    """`["decay=none,scalar", "pattern=LLLL,LLLN"]` -> ordered axes; ValueError on malformed ones."""
    axes: dict[str, list[str]] = {}
    for spec in specs:
        axis, sep, values = spec.partition("=")
        axis = axis.strip()
        options = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not options:
            raise ValueError(f"--vary {spec!r}: write AXIS=v1,v2,...")
        if axis not in ("lsm", "decay", "delta", "momentum", "minibatch", "pattern") and not KEY.match(axis):
            raise ValueError(f"--vary {spec!r}: unknown axis {axis!r} (lsm, decay, delta, momentum, minibatch, pattern, "
                             "lsm.KEY, model.KEY, lsm.BLOCK.KEY, model.BLOCK.KEY)")
        if axis == "decay" and (bad := [v for v in options if v not in DECAY_GATES]):
            raise ValueError(f"--vary decay: unknown kind {bad[0]!r} (choose from {', '.join(DECAY_GATES)})")
        if axis == "delta" and (bad := [v for v in options if v not in DELTA_RULES]):
            raise ValueError(f"--vary delta: {bad[0]!r} is not off or on")
        if axis == "momentum" and (bad := [v for v in options if v not in MOMENTUM]):
            raise ValueError(f"--vary momentum: {bad[0]!r} is not off or on")
        if axis == "minibatch" and (bad := [v for v in options if not (v.isdigit() and int(v) >= 1)]):
            raise ValueError(f"--vary minibatch: {bad[0]!r} is not a whole number >= 1 (1: a gradient at every token)")
        if axis in axes:
            raise ValueError(f"--vary {axis} given twice")
        if len(set(options)) != len(options):
            raise ValueError(f"--vary {axis}: repeated values")
        axes[axis] = options
    if not axes:
        raise ValueError("give at least one --vary AXIS=v1,v2,...")
    return axes


def _slug(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", value).strip("-") or "x"


def variant_name(base: str, point: dict[str, str]) -> str:
    parts = [f"{_slug(axis.split('.')[-1])}-{_slug(value)}" for axis, value in point.items()]
    return re.sub(r"[^A-Za-z0-9_]", "_", base) + "__" + "__".join(parts).replace("-", "_")


def _lsm_source(value: str) -> Path:
    path = Path(value)
    if path.suffix == ".lsm":
        return path.resolve()
    return (SPECS / "lsm" / f"{value}.lsm").resolve()


def render_variant(base_path: Path, out_dir: Path, point: dict[str, str]) -> Variant:
    """The text of one variant spec: imports and overrides only."""
    ir = load_spec(base_path)
    model = ir.model
    if model is None:
        raise ValueError(f"{base_path}: variants derive from a model spec; this one defines no model")
    name = variant_name(base_path.stem, point)
    imports = [base_path.resolve()]
    base_lsm = model.lsm
    if "lsm" in point:
        lsm_file = _lsm_source(point["lsm"])
        imports.append(lsm_file)
        lsm_ir = load_spec(lsm_file)
        base_lsm = next(iter(lsm_ir.lsms)) if len(lsm_ir.lsms) == 1 else point["lsm"]
    lsm_lines = []
    if "decay" in point:
        lsm_lines += ["decay = none", *DECAY_GATES[point["decay"]]]
    if "delta" in point:
        lsm_lines.append(DELTA_RULES[point["delta"]])
    model_lines = []
    if "pattern" in point:
        model_lines.append(f'pattern = "{point["pattern"]}"')
    blocks: dict[tuple[str, str], list[str]] = {}
    if "momentum" in point:  # the update's own axes merge over the base lsm's update { }, with any lsm.update.KEY
        blocks.setdefault(("lsm", "update"), []).append(MOMENTUM[point["momentum"]])
    if "minibatch" in point:
        n = int(point["minibatch"])
        blocks.setdefault(("lsm", "update"), []).append("gradient = token" if n == 1 else f"gradient = minibatch({n})")
    for axis, value in point.items():
        if (m := KEY.match(axis)) is not None:
            if m.group(2) is None:
                (lsm_lines if m.group(1) == "lsm" else model_lines).append(f"{m.group(3)} = {value}")
            else:
                blocks.setdefault((m.group(1), m.group(2)), []).append(f"{m.group(3)} = {value}")
    for (where, block), keys in blocks.items():
        (lsm_lines if where == "lsm" else model_lines).append(f"{block} {{ {' '.join(keys)} }}")
    lines = [
        f"# {name}: a variant of {base_path.name} ({', '.join(f'{a}={v}' for a, v in point.items())}).",
        f"{WRITTEN_BY}: overrides only; the base spec is the source of truth.",
    ]
    lines += [f'import "{os.path.relpath(p, out_dir.resolve())}"' for p in dict.fromkeys(imports)]
    lines.append("")
    lsm_name = base_lsm
    if base_lsm is not None and lsm_lines:
        lsm_name = f"{name}_lsm"
        lines += [f"lsm {lsm_name} extends {base_lsm} {{"] + [f"    {line}" for line in lsm_lines] + ["}", ""]
    elif base_lsm is None and lsm_lines:
        raise ValueError(f"{base_path}: model {model.name!r} has no lsm to vary ({', '.join(lsm_lines)})")
    if lsm_name != model.lsm:
        model_lines.insert(0, f"lsm = {lsm_name}")
    lines += [f"model {name} extends {model.name} {{"] + [f"    {line}" for line in model_lines] + ["}"]
    return Variant(name=name, point=dict(point), text="\n".join(lines) + "\n")


def variant_files(folder: Path) -> Optional[set[str]]:
    """The files of `folder` that `lmoec variants` wrote: its manifest and the variant specs it lists that still
    carry the header; None if the folder holds no variants manifest (it is not a variants folder)."""
    try:
        _, manifest = load_manifest(folder)
    except (OSError, ValueError):
        return None
    ours = {"manifest.json"}
    for v in manifest["variants"]:
        spec = v.get("spec") if isinstance(v, dict) else None
        if isinstance(spec, str) and spec.endswith(".lsm") and Path(spec).name == spec:
            try:
                if (Path(folder) / spec).read_text(encoding="utf-8").split("\n", 2)[1].startswith(WRITTEN_BY):
                    ours.add(spec)
            except (OSError, UnicodeDecodeError, IndexError):
                pass
    return ours


def make_variants(base_path: Path, axes: dict[str, list[str]], out_dir: Path,
                  force: bool = False) -> tuple[list[dict], list[Rejected]]:
    """Write every valid grid point's spec and a manifest.json into out_dir; return (written, rejected).

    out_dir follows lmoec.output's rules: an earlier variants folder is updated in place (variant specs of the
    old grid that the new one lacks are removed; sweep results, notes and anything else are kept); another
    non-empty folder is refused unless force.
    """
    base_path = Path(base_path)
    if not base_path.is_file():
        raise FileNotFoundError(2, "no such file", str(base_path))
    out_dir = Path(out_dir)
    ours = variant_files(out_dir)
    check_target(out_dir, ours, force)  # before the probes below write into it
    made = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # innermost first
    try:
        return _make_variants(base_path, axes, out_dir, ours, force)
    except BaseException:
        if made:  # the folders made for the probes: leave nothing behind
            shutil.rmtree(out_dir, ignore_errors=True)
            for folder in made[1:]:
                try:
                    folder.rmdir()
                except OSError:
                    break
        raise


def _make_variants(base_path: Path, axes: dict[str, list[str]], out_dir: Path, ours: Optional[set[str]],
                   force: bool) -> tuple[list[dict], list[Rejected]]:
    staged: dict[str, str] = {}
    written: list[dict] = []
    rejected: list[Rejected] = []
    for values in itertools.product(*axes.values()):
        point = dict(zip(axes, values))
        variant = render_variant(base_path, out_dir, point)
        # compile it from where it will live, so relative imports resolve as they will
        probe = out_dir.resolve() / f".probe-{variant.name}.lsm"
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            probe.write_text(variant.text)
            ir = run_passes(load_spec(probe))
        except SpecError as err:
            rejected.append(Rejected(point, err.message))
            continue
        finally:
            probe.unlink(missing_ok=True)
        total, active = param_counts(ir)
        staged[f"{variant.name}.lsm"] = variant.text
        written.append({
            "name": variant.name,
            "spec": f"{variant.name}.lsm",
            "point": point,
            "family": ir.lsms[ir.model.lsm].recurrence.key if ir.model.lsm else "attention",
            "pattern": ir.model.pattern,
            "params_total": total,
            "params_active": active,
        })
    manifest = {
        "base": os.path.relpath(base_path.resolve(), out_dir.resolve()),
        "axes": axes,
        "variants": written,
        "rejected": [{"point": r.point, "reason": r.reason} for r in rejected],
    }
    staged["manifest.json"] = json.dumps(manifest, indent=2) + "\n"
    write_files(out_dir, staged, ours, force)
    return written, rejected


def load_manifest(path: Path) -> tuple[Path, dict]:
    """(folder, manifest) of a variants manifest; ValueError if it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a variants manifest ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("variants"), list):
        raise ValueError(f"{path}: not a variants manifest (no 'variants' list)")
    return path.parent, manifest


def default_out_dir(base_path: Path, out: Optional[str]) -> Path:
    return Path(out) if out else Path("variants") / base_path.stem
