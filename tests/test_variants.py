"""`lmoec variants` and `lmoec sweep`: grid, names, rejected points, an end-to-end sweep on CPU."""
import csv
import json
import subprocess
import sys

import pytest

from lmoec.frontend import load_spec
from lmoec.paths import SPECS
from lmoec.sweep import SweepConfig, run_sweep
from lmoec.tasks.mqar import MQARConfig
from lmoec.variants import make_variants, parse_axes, variant_name

BASE = f"""
import "{SPECS / 'lsm' / 'gla.lsm'}"
model small {{
    vocab = 64  hidden = 32  layers = 2  heads = 2  pattern = "LN"  lsm = gla
    moe {{ experts = 4 top_k = 2 expert_ffn = 32 }}
    max_seq_len = 64
}}
"""


@pytest.fixture()
def base(tmp_path):
    path = tmp_path / "small.lsm"
    path.write_text(BASE)
    return path


def test_grid_writes_one_spec_per_point_with_stable_names(base, tmp_path):
    axes = parse_axes(["decay=none,scalar,vector", "delta=off,on", "pattern=LL,LN"])
    out = tmp_path / "v"
    written, rejected = make_variants(base, axes, out)
    assert len(written) == 12 and not rejected
    assert written[0]["name"] == variant_name("small", {"decay": "none", "delta": "off", "pattern": "LL"}) == "small__decay_none__delta_off__pattern_LL"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [v["name"] for v in manifest["variants"]] == [w["name"] for w in written]
    families = {(v["point"]["decay"], v["point"]["delta"]): v["family"] for v in written}
    assert families[("none", "off")] == "additive" and families[("vector", "on")] == "delta_vector"
    for v in written:  # each file is overrides of the base, and compiles on its own
        text = (out / v["spec"]).read_text()
        assert "extends small" in text and "import" in text
        ir = load_spec(out / v["spec"])
        assert ir.model.pattern == v["point"]["pattern"]
    # the same grid again gives the same bytes
    again = tmp_path / "again"
    make_variants(base, axes, again)
    assert all((out / f.name).read_bytes() == f.read_bytes() for f in again.iterdir())


def test_decay_axis_reaches_the_elementwise_kind_and_back(base, tmp_path):
    """decay=outer_sum (GFW) and outer_product (Mamba's gate) make element-wise variants of GLA; switching a
    Mamba base back to a vector decay drops its step and rate (each decay point starts from `decay = none`)."""
    written, rejected = make_variants(base, parse_axes(["decay=outer_sum,outer_product"]), tmp_path / "v")
    assert not rejected
    assert [w["family"] for w in written] == ["elementwise_outer_sum", "elementwise_outer_product"]
    mamba_base = tmp_path / "mamba_base.lsm"
    mamba_base.write_text(BASE.replace("gla.lsm", "mamba.lsm").replace("lsm = gla", "lsm = mamba"))
    written, rejected = make_variants(mamba_base, parse_axes(["decay=vector"]), tmp_path / "back")
    assert not rejected and written[0]["family"] == "vector"


def test_update_axes_vary_momentum_and_minibatch(base, tmp_path):
    """momentum=off,on and minibatch=1,16 over a Titans base: the per-token form without momentum (but with weight
    decay) stays a titans update, with momentum it gains the joint state, minibatch(16) moves the gradient point; on
    a base without an update the points are rejected with the compiler's message."""
    titans = tmp_path / "titans_base.lsm"
    titans.write_text(BASE.replace("gla.lsm", "titans.lsm").replace("lsm = gla", "lsm = titans"))
    written, rejected = make_variants(titans, parse_axes(["momentum=off,on", "minibatch=1,16"]), tmp_path / "v")
    assert not rejected
    assert [w["family"] for w in written] == ["titans_wd", "titans_wd_mb16", "titans_momentum_wd",
                                              "titans_momentum_wd_mb16"]
    assert "update { momentum = none gradient = minibatch(16) }" in (tmp_path / "v" / written[1]["spec"]).read_text()
    _, rejected = make_variants(base, parse_axes(["momentum=on"]), tmp_path / "gla")
    assert rejected and "lr" in rejected[0].reason


def test_invalid_points_are_reported_not_written(base, tmp_path):
    written, rejected = make_variants(base, parse_axes(["pattern=LL,LLL,LX"]), tmp_path / "v")
    assert [w["point"]["pattern"] for w in written] == ["LL"]
    assert {r.point["pattern"] for r in rejected} == {"LLL", "LX"}
    assert all(r.reason for r in rejected)
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["manifest.json", "small__pattern_LL.lsm"]


@pytest.mark.parametrize("bad", ["decay", "decay=sideways", "colour=red", "delta=maybe", "momentum=yes", "minibatch=0"])
def test_malformed_axes_are_errors(bad):
    with pytest.raises(ValueError):
        parse_axes([bad])


@pytest.mark.parametrize("jobs, lrs", [(1, (3e-3,)), (2, (1e-3, 1e-2))])
def test_two_variant_sweep_end_to_end(base, tmp_path, jobs, lrs):
    written, _ = make_variants(base, parse_axes(["lsm=bla,deltanet"]), tmp_path / "v")
    cfg = SweepConfig(task="mqar", steps=3, batch=4, lrs=lrs, mqar=MQARConfig(seq_len=32, num_pairs=4, vocab=64),
                      eval_batches=2, device="cpu")
    rows = run_sweep(tmp_path / "v" / "manifest.json", cfg, tmp_path / "out", say=lambda _: None, jobs=jobs)
    for r in rows:  # every learning rate ran; the row is the best of them
        assert [run["lr"] for run in r["runs"]] == list(lrs)
        assert r["value"] == max(run["value"] for run in r["runs"]) and r["lr"] in lrs
    assert [r["family"] for r in rows] == ["additive", "delta"]
    assert all(0.0 <= r["value"] <= 1.0 and len(r["curve"]) == 3 for r in rows)
    table = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert [t["name"] for t in table] == [w["name"] for w in written]
    assert (tmp_path / "out" / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "recall_accuracy" in (tmp_path / "out" / "results.md").read_text()


def test_cli_reports_bad_input_without_traceback(base, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "lmoec", *a], capture_output=True, text=True)
    r = run("variants", str(base), "--vary", "colour=red", "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown axis 'colour'" in r.stderr and "Traceback" not in r.stderr
    r = run("sweep", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
    for flag, message in [("--jobs=0", "positive integer"), ("--lr=abc", "not a learning rate"), ("--lr=1e-3,-1", "must be positive")]:
        r = run("sweep", str(tmp_path / "missing.json"), flag)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (flag, r.stderr)
    assert not (tmp_path / "x").exists()
