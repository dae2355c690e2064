"""The frontend: library specs lower to the intended IR; imports, extends, expressions, no eval."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import sympy

from lmoec.errors import SpecError
from lmoec.frontend import load_spec
from lmoec.ir import expr as ex
from lmoec.ir.graph import embedding_params, layer_graph, param_counts
from lmoec.ir.nodes import Family, SpecIR
from lmoec.passes import run_passes
from lmoec.paths import ROOT, SPECS

x, h, H, K = (sympy.Symbol(n) for n in ("x", "h", "H", "K"))

# spec -> (family, recurrence key)
FAMILIES = {
    "bla": "additive",
    "lightning": "constant",
    "retnet": "constant",
    "simple_gla": "scalar",
    "mamba2": "scalar",
    "gateloop": "scalar",
    "gla": "vector",
    "hgrn2": "vector",
    "rwkv6": "vector_bonus",
    "deltanet": "delta",
    "gated_deltanet": "delta_scalar",
    "rwkv7": "dplr_vector",
    "based": "additive",
    "rebased": "additive",
}


def lsm_of(name: str):
    ir = run_passes(load_spec(SPECS / "lsm" / f"{name}.lsm"))
    assert list(ir.lsms) == [name]
    return ir, ir.lsms[name]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_library_lsm_family(name):
    ir, lsm = lsm_of(name)
    assert lsm.recurrence.key == FAMILIES[name]
    assert ir.name == name and ir.source == f"specs/lsm/{name}.lsm"
    assert lsm.doc, "every library spec documents its paper"
    assert lsm.loc.file == ir.source
    # the IR dump reads back to the same IR (no eval: expressions are JSON trees)
    again = SpecIR.model_validate(json.loads(ir.dump()))
    assert again.dump() == ir.dump()


def test_library_fields():
    _, gla = lsm_of("gla")
    assert gla.expand_k == 0.5 and gla.output_norm == "rmsnorm"
    inner = ex.linear(x, "W_gk", 16)
    assert gla.decay.expr == ex.function("logsigmoid")(ex.linear(inner, "W_gk2", 0)) / 16
    assert gla.output_gate == ex.function("swish")(ex.linear(x, "W_og", 0))

    _, retnet = lsm_of("retnet")
    assert retnet.decay.expr == sympy.log(1 - 2 ** (-5 - h))
    _, delta = lsm_of("deltanet")
    assert delta.feature_map_q == ["silu", "l2norm"] and delta.short_conv == 4
    assert delta.delta.beta == ex.function("sigmoid")(ex.linear(x, "W_beta", 0))
    _, rwkv6 = lsm_of("rwkv6")
    assert rwkv6.bonus_u and rwkv6.params["u"].shape == ["H", "K"]
    assert rwkv6.params["u"].init == sympy.Float(0.5) * (1 - sympy.Symbol("i") / K)
    _, hgrn2 = lsm_of("hgrn2")
    assert hgrn2.tie_k_to_decay and hgrn2.decay.kind == "vector"
    _, rwkv7 = lsm_of("rwkv7")
    assert rwkv7.dplr is not None and rwkv7.decay.kind == "vector"
    _, mamba2 = lsm_of("mamba2")
    assert set(mamba2.params) == {"A_log", "dt_bias"} and mamba2.scale == 1
    _, based = lsm_of("based")
    assert based.feature_map_q == ["taylor2"]
    _, rebased = lsm_of("rebased")
    assert rebased.feature_map_k == ["rebased"]


def test_model_specs():
    ir = run_passes(load_spec(SPECS / "models" / "a0.3b-2b.lsm"))
    m = ir.model
    assert (m.hidden, m.layers, m.heads, m.pattern) == (1024, 12, 8, "L" * 12)
    assert (m.moe.experts, m.moe.top_k, m.moe.expert_ffn) == (64, 8, 896)
    assert list(ir.lsms) == ["gla"], "the model's imported lsm is part of the IR"
    hybrid = run_passes(load_spec(SPECS / "models" / "a0.3b-2b-hybrid.lsm")).model
    assert hybrid.pattern == "LLLN" * 3 and hybrid.moe == m.moe and hybrid.name == "a0_3b_2b_hybrid"
    big = load_spec(SPECS / "models" / "a1b-7b-hybrid.lsm").model
    assert (big.hidden, big.layers, big.heads, big.moe.expert_ffn, big.pattern) == (2048, 16, 16, 1024, "LLLN" * 4)
    tiny = load_spec(SPECS / "models" / "tiny.lsm").model
    assert (tiny.vocab, tiny.hidden, tiny.layers, tiny.pattern, tiny.max_seq_len) == (256, 128, 4, "LLLN", 256)


def test_param_counts_match_the_paper_names():
    ir = run_passes(load_spec(SPECS / "models" / "a0.3b-2b.lsm"))
    total, active = param_counts(ir)
    emb = embedding_params(ir)
    print(f"A0.3B-2B: total {total:,}, active {active:,}; without embeddings {total - emb:,} / {active - emb:,}")
    assert 1.9e9 < total - emb < 2.4e9 and 0.25e9 < active - emb < 0.35e9
    # experts dominate: 12 layers x 64 experts x SwiGLU(1024 -> 896)
    assert total - active == 12 * 56 * 3 * 1024 * 896
    g = layer_graph(ir)
    assert g.number_of_nodes() == 1 + 2 * 12 + 2
    assert [g.nodes[n]["kind"] for n in ("embed", "layer0.lsm", "layer0.moe", "final_norm", "head")] == \
        ["embedding", "lsm", "moe", "norm", "head"]
    big = run_passes(load_spec(SPECS / "models" / "a1b-7b.lsm"))
    t, a = param_counts(big)
    e = embedding_params(big)
    print(f"A1B-7B: total {t:,}, active {a:,}; without embeddings {t - e:,} / {a - e:,}")
    assert 6e9 < t - e < 7.5e9 and 0.9e9 < a - e < 1.2e9


def test_lsm_param_count_by_hand(tmp_path):
    spec = tmp_path / "m.lsm"
    spec.write_text("""
lsm s { decay vector = logsigmoid(x @ W_a[4] @ W_b) short_conv = 2 output_norm = rmsnorm param p[H, K] = 0 }
model m { vocab = 10 hidden = 8 heads = 2 pattern = "L" lsm = s ffn { ffn = 3 } tie_embeddings = true }
""")
    ir = run_passes(load_spec(spec))
    H_, K_, V_, d = 2, 4, 4, 8
    lsm = 4 * d * H_ * K_ + 2 * (3 * H_ * K_) + d * 4 + 4 * H_ * K_ + H_ * K_ + V_
    expected = 10 * d + (lsm + d) + (3 * d * 3 + d) + d
    assert param_counts(ir) == (expected, expected)


def write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_imports_and_extends(tmp_path):
    write(tmp_path, "lib/base.lsm", "# the base\nlsm base { decay scalar = logsigmoid(x @ W) short_conv = 4 }\n")
    write(tmp_path, "lib/more.lsm", 'import "base.lsm"\nlsm other extends base { short_conv = 2 }\n')
    main = write(tmp_path, "main.lsm", """
import "lib/more.lsm"
import "lib/base.lsm"
lsm fast extends other { decay vector = logsigmoid(x @ W2) / 8 }
model m { vocab = 16 hidden = 32 heads = 2 pattern = "LN" lsm = other moe { experts = 4 top_k = 2 expert_ffn = 8 } }
""")
    ir = run_passes(load_spec(main))
    assert list(ir.lsms) == ["fast", "other"]
    fast, other = ir.lsms["fast"], ir.lsms["other"]
    assert other.short_conv == 2 and other.decay.kind == "scalar" and other.doc == "the base", "an undocumented variant keeps its base's doc"
    assert fast.short_conv == 2 and fast.decay.kind == "vector" and fast.recurrence.key == "vector"
    assert ex.free_names(fast.decay.expr) == {"x"}
    # the base is untouched by its derivations
    assert load_spec(tmp_path / "lib/base.lsm").lsms["base"].short_conv == 4
    assert ir.source == str(main) and ir.name == "main"


def test_override_removes_parts(tmp_path):
    main = write(tmp_path, "v.lsm", f'import "{SPECS}/lsm/gated_deltanet.lsm"\n'
                 "lsm plain extends gated_deltanet { decay = none output_gate = none }\n"
                 "lsm nodelta extends gated_deltanet { delta = none }\n")
    ir = run_passes(load_spec(main))
    assert ir.lsms["plain"].recurrence.key == "delta" and ir.lsms["plain"].output_gate is None
    assert ir.lsms["nodelta"].recurrence.key == "scalar"


def test_model_extends_and_dense(tmp_path):
    main = write(tmp_path, "d.lsm", f'import "{SPECS}/models/a0.3b-2b.lsm"\n'
                 'model dense extends a0_3b_2b { layers = 4 pattern = "LLLN" ffn { ffn = 2816 } moe { } }\n')
    with pytest.raises(SpecError, match="either a moe"):
        load_spec(main)
    main.write_text(f'import "{SPECS}/models/a0.3b-2b.lsm"\n'
                    'model dense extends a0_3b_2b { layers = 4 pattern = "LLLN" ffn { ffn = 2816 } }\n')
    m = load_spec(main).model
    assert m.moe is None and m.ffn.ffn == 2816 and m.hidden == 1024 and m.layers == 4
    main.write_text(f'import "{SPECS}/models/a0.3b-2b.lsm"\nmodel few extends a0_3b_2b {{ moe {{ top_k = 2 }} }}\n')
    m = load_spec(main).model
    assert (m.moe.top_k, m.moe.experts) == (2, 64)


def test_import_cycle_across_files(tmp_path):
    write(tmp_path, "a.lsm", 'import "b.lsm"\nlsm a { }\n')
    write(tmp_path, "b.lsm", 'import "a.lsm"\nlsm b { }\n')
    with pytest.raises(SpecError, match=r"import cycle: a.lsm -> b.lsm -> a.lsm") as info:
        load_spec(tmp_path / "a.lsm")
    assert info.value.loc.file.endswith("b.lsm") and info.value.loc.line == 1


def test_diamond_import_is_not_a_conflict(tmp_path):
    write(tmp_path, "base.lsm", "lsm base { }\n")
    write(tmp_path, "l.lsm", 'import "base.lsm"\nlsm l extends base { }\n')
    write(tmp_path, "r.lsm", 'import "base.lsm"\nlsm r extends base { }\n')
    main = write(tmp_path, "m.lsm", 'import "l.lsm"\nimport "r.lsm"\nlsm top extends l { }\n')
    assert list(load_spec(main).lsms) == ["top"]


def test_missing_top_level_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_spec(tmp_path / "nope.lsm")


@pytest.mark.parametrize("text,expected", [
    ("x @ W", ex.linear(x, "W", 0)),
    ("x @ W[16] @ W2", ex.linear(ex.linear(x, "W", 16), "W2", 0)),
    ("-exp(A) * softplus(x @ W + b)", -sympy.exp(sympy.Symbol("A")) * ex.function("softplus")(ex.linear(x, "W", 0) + sympy.Symbol("b"))),
    ("log(1 - 2 ** (-5 - h))", sympy.log(1 - 2 ** (-5 - h))),
    ("max(x @ W, -5) / 2", sympy.Max(ex.linear(x, "W", 0), -5) / 2),
    ("sigmoid(x @ W) * 2 - 1", 2 * ex.function("sigmoid")(ex.linear(x, "W", 0)) - 1),
])
def test_expression_lowering(tmp_path, text, expected):
    spec = write(tmp_path, "e.lsm", f"lsm e {{ param A[H] = 0 param b[H] = 0 output_gate = {text} }}\n")
    assert load_spec(spec).lsms["e"].output_gate == expected


@pytest.mark.parametrize("text", [
    '__import__("os")',
    'exec("print(1)")',
    "x.__class__",
    "lambda: 1",
    "x[0]",
    "open('f')",
])
def test_python_is_a_syntax_error(tmp_path, text):
    spec = write(tmp_path, "p.lsm", f"lsm p {{ output_gate = {text} }}\n")
    with pytest.raises(SpecError, match="syntax error"):
        load_spec(spec)


@pytest.mark.parametrize("text", ["eval(x)", "__import__(x)", "getattr(x, x)"])
def test_python_names_are_unknown_functions(tmp_path, text):
    spec = write(tmp_path, "p.lsm", f"lsm p {{ output_gate = {text} }}\n")
    with pytest.raises(SpecError, match="unknown function"):
        load_spec(spec)


def test_doc_comment_and_source_path():
    ir = load_spec(ROOT / "specs" / "lsm" / "gla.lsm")
    assert ir.source == "specs/lsm/gla.lsm"
    assert ir.lsms["gla"].doc.startswith("GLA: gated linear attention")


def test_several_statements_per_line_and_defaults(tmp_path):
    spec = write(tmp_path, "s.lsm", "lsm s { heads = 2 expand_v = 2 feature_map = silu, l2norm bonus u decay vector = -exp(x @ W) }")
    lsm = run_passes(load_spec(spec)).lsms["s"]
    assert (lsm.heads, lsm.expand_v, lsm.feature_map_q, lsm.feature_map_k) == (2, 2.0, ["silu", "l2norm"], ["silu", "l2norm"])
    assert lsm.params["u"].shape == ["H", "K"] and lsm.recurrence.family == Family.vector and lsm.recurrence.bonus
