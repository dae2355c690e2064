"""Emitted LSM layer modules (`Program.layer`): shapes, gradients, decoding, the expression printer, errors."""
import builtins
from pathlib import Path

import pytest
import sympy
import torch

import lmoec
from lmoec.backends import modules
from lmoec.backends.printer import Slot, print_torch, projections_of
from lmoec.ir import expr as ex
from lmoec.ir.nodes import DenseFFNSpec, Decay, Delta, LSMSpec, ModelSpec, Param, SpecIR
from lmoec.kinds import kind_of
from lmoec.passes.classify import classify
from lmoec.paths import SPECS
from lmoec.program import compile_ir

LSM_SPECS = sorted((SPECS / "lsm").glob("*.lsm"))
x, q, k, v, h, H, K, i = sympy.symbols("x q k v h H K i")
fn = ex.function


def program_of(*lsms: LSMSpec, model=None):
    return compile_ir(SpecIR(name="t_layers", source="<test>", lsms={l.name: l for l in lsms}, model=model))


def _compiled(path: Path):
    return lmoec.compile_spec(path)


def tokens(layer, batch, length, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, layer.hidden, generator=gen, dtype=dtype)


def perturb(layer, seed=1):
    """Move every parameter off its init (zeros, ones) so each one matters in the comparisons."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


# ---- every spec in the library -------------------------------------------------


def test_the_spec_library_is_there():
    assert len(LSM_SPECS) >= 14, [p.name for p in LSM_SPECS]


@pytest.mark.parametrize("path", LSM_SPECS, ids=lambda p: p.stem)
def test_spec_layer_forward_backward(path):
    """Every spec's layer runs forward + backward on the torch backend, and every parameter gets a gradient."""
    torch.manual_seed(0)
    layer = _compiled(path).layer(hidden=64, heads=4)
    xs = torch.randn(2, 11, 64, requires_grad=True)
    y = layer(xs, backend="torch")
    assert y.shape == (2, 11, 64)
    assert torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(xs.grad).all() and xs.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


@pytest.mark.parametrize("path", LSM_SPECS, ids=lambda p: p.stem)
def test_spec_layer_decoding_matches_full_forward(path):
    """float64: prefill (chunkwise from no state) then token-by-token steps == one full forward, and the caches agree."""
    rec = _compiled(path).ir.lsm().recurrence
    layer = _compiled(path).layer(hidden=32, heads=2).double()
    perturb(layer)
    xs = tokens(layer, 2, 9)
    full, full_cache = layer(xs, use_cache=True, backend="torch")

    y, cache = layer(xs[:, :4], use_cache=True, backend="torch")  # prefill, T > 1
    outs = [y]
    for t in range(4, 9):  # constant-memory steps
        y, cache = layer(xs[:, t : t + 1], past=cache, use_cache=True, backend="torch")
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-10)
    assert cache.keys() == full_cache.keys()
    for key in cache:
        torch.testing.assert_close(cache[key], full_cache[key], rtol=1e-9, atol=1e-10)
    memories = _compiled(path).ir.lsm().memories  # with memories (mom): one state per memory
    lead = (memories.states,) if memories else ()
    kind = kind_of(rec)  # Titans: the memory and its momentum side by side; TTT-Linear: the inner bias as a row
    assert cache["state"].shape == (*lead, 2, layer.heads, layer.head_k + kind.state_rows, kind.state_width * layer.head_v)


def test_decoding_from_the_first_token_and_split_prefill():
    """Gated DeltaNet (short conv, delta, scalar decay): one token at a time from t=0, and prefill in two chunks."""
    layer = _compiled(SPECS / "lsm" / "gated_deltanet.lsm").layer(hidden=32, heads=2).double()
    perturb(layer)
    xs = tokens(layer, 1, 7)
    full = layer(xs, backend="torch")
    cache, outs = None, []
    for t in range(7):
        y, cache = layer(xs[:, t : t + 1], past=cache, use_cache=True, backend="torch")
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-10)
    y1, c1 = layer(xs[:, :3], use_cache=True, backend="torch")
    y2 = layer(xs[:, 3:], past=c1, backend="torch")
    torch.testing.assert_close(torch.cat([y1, y2], 1), full, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["rwkv6", "rwkv7", "retnet"])
def test_torch_backend_equals_reference_in_the_layer(name):
    layer = _compiled(SPECS / "lsm" / f"{name}.lsm").layer(hidden=32, heads=2).double()
    perturb(layer)
    xs = tokens(layer, 2, 6)
    torch.testing.assert_close(layer(xs, backend="torch"), layer(xs, backend="reference"), rtol=1e-9, atol=1e-10)


def test_layer_defaults_come_from_the_model():
    path = SPECS / "models" / "tiny.lsm"
    if not path.exists():
        pytest.skip("specs/models/tiny.lsm is not written yet")
    prog = lmoec.compile_spec(path)
    layer = prog.layer()
    assert (layer.hidden, layer.heads, layer.layers) == (prog.ir.model.hidden, prog.ir.lsm().heads or prog.ir.model.heads, prog.ir.model.layers)


# ---- layers built from IR directly: the features the library doesn't exercise ----------------


def lsm(name="t", **fields):
    return LSMSpec(name=name, **fields)


def test_taylor2_expands_the_key_dim_and_decodes():
    spec = lsm(
        feature_map_q=["taylor2"],
        feature_map_k=["taylor2"],
        decay=Decay(kind="vector", expr=fn("logsigmoid")(ex.linear(x, "W_g")) / 16),
        expand_k=0.25,
    )
    layer = program_of(spec).layer(hidden=32, heads=2).double()
    assert (layer.key_proj_dim, layer.head_k) == (4, 1 + 4 + 16)
    assert layer.W_g.out_features == 2 * 21  # a vector decay is as wide as the expanded K
    xs = tokens(layer, 1, 5)
    full = layer(xs, backend="reference")
    y, cache = layer(xs[:, :2], use_cache=True, backend="reference")
    y2 = layer(xs[:, 2:3], past=cache, backend="torch")  # step
    torch.testing.assert_close(torch.cat([y, y2], 1), full[:, :3])


def test_taylor2_feature_map_is_the_second_order_taylor_kernel():
    spec = lsm(feature_map_q=["taylor2"], feature_map_k=["taylor2"])
    mod = program_of(spec).package.t_layer
    a, b = torch.randn(2, 5, dtype=torch.float64)
    dot = (a * b).sum()
    torch.testing.assert_close((mod.taylor2(a) * mod.taylor2(b)).sum(), 1 + dot + dot**2 / 2)


def test_rebased_kernel_is_learnable_quadratic():
    spec = lsm(feature_map_q=["rebased"], feature_map_k=["rebased"], expand_k=0.25)
    layer = program_of(spec).layer(hidden=32, heads=2)
    assert layer.head_k == 16 and layer.q_rebased_gamma.shape == (4,)
    mod = program_of(spec).package.t_layer
    a, b, gamma, beta = torch.randn(4, 4, dtype=torch.float64)
    ya, yb = gamma * a + beta, gamma * b + beta
    torch.testing.assert_close((mod.rebased(a, gamma, beta) * mod.rebased(b, gamma, beta)).sum(), (ya * yb).sum() ** 2)


def test_constant_decay_reads_h_and_layer_and_params_init_from_h_and_i():
    spec = lsm(
        decay=Decay(kind="constant", expr=-(2 ** (-8 * (h + 1) / H)) * (1 - sympy.Symbol("layer") / 4)),
        params={"w": Param(name="w", shape=["H", "K"], init=h * 10 + i)},
        output_gate=fn("sigmoid")(ex.linear(x, "W_og")),
    )
    layer = program_of(spec).layer(hidden=16, heads=2, layer_idx=1, layers=4)
    expected = -(2.0 ** (-8 * (torch.arange(2, dtype=torch.float64) + 1) / 2)) * (1 - 1 / 4)
    torch.testing.assert_close(layer.log_decay(dtype=torch.float64), expected)
    torch.testing.assert_close(layer.w.detach(), (torch.arange(2)[:, None] * 10 + torch.arange(8)[None, :]).float())


def test_gates_reading_h_and_min_max_clamps():
    spec = lsm(
        decay=Decay(kind="vector", expr=sympy.Max(fn("logsigmoid")(ex.linear(x, "W_g")) * (h + 1) / H, -5)),
        delta=Delta(beta=sympy.Min(2 * fn("sigmoid")(ex.linear(ex.linear(x, "W_b1", 8), "W_b2")), 1.5)),
        output_gate=fn("silu")(ex.linear(x, "W_og")) * (h + 1),
    )
    layer = program_of(spec).layer(hidden=16, heads=2).double()
    perturb(layer)
    xs = tokens(layer, 1, 4)
    full, cache = layer(xs, use_cache=True, backend="torch")
    y, c = layer(xs[:, :3], use_cache=True, backend="torch")
    y2, c2 = layer(xs[:, 3:], past=c, use_cache=True, backend="torch")
    torch.testing.assert_close(torch.cat([y, y2], 1), full)
    torch.testing.assert_close(c2["state"], cache["state"])
    assert layer.W_b1.in_features == 16 and layer.W_b1.out_features == 8 and layer.W_b2.out_features == 2


def test_hgrn2_tie_has_no_k_projection():
    layer = _compiled(SPECS / "lsm" / "hgrn2.lsm").layer(hidden=32, heads=2)
    assert not hasattr(layer, "k_proj")


def test_emission_is_deterministic():
    a = _compiled(SPECS / "lsm" / "rwkv7.lsm").files["rwkv7_layer.py"]
    b = _compiled(SPECS / "lsm" / "rwkv7.lsm").files["rwkv7_layer.py"]
    assert a == b and "class Layer(nn.Module)" in a and "from .rwkv7_ops import op, step" in a


# ---- the printer ------------------------------------------------------------------------------

SYMBOLS = {"x": "x", "h": "h", "H": "self.heads", "K": "self.head_k", "A_log": "self.A_log", "dt_bias": "self.dt_bias"}
SCALAR = Slot("self.heads")
PER_KEY = Slot("self.heads * self.head_k", "(self.heads, self.head_k)")


def test_printer_output():
    mamba = -sympy.exp(sympy.Symbol("A_log")) * fn("softplus")(ex.linear(x, "W_dt") + sympy.Symbol("dt_bias"))
    assert print_torch(mamba, SYMBOLS, {"x", "A_log", "dt_bias"}, SCALAR) == "-F.softplus(self.dt_bias + self.W_dt(x))*torch.exp(self.A_log)"
    gla = fn("logsigmoid")(ex.linear(ex.linear(x, "W_1", 16), "W_2")) / 16
    assert print_torch(gla, SYMBOLS, {"x"}, PER_KEY) == "F.logsigmoid(self.W_2(self.W_1(x)).unflatten(-1, (self.heads, self.head_k)))/16"
    assert [(p.weight, p.in_features, p.out_features) for p in projections_of(gla, PER_KEY)] == [
        ("W_1", "self.hidden", "16"), ("W_2", "16", "self.heads * self.head_k")]
    assert print_torch(sympy.log(1 - 2 ** (-5 - h)), SYMBOLS, {"h"}) == "torch.log(1 - 2**(-h - 5))"
    assert print_torch(K ** sympy.Rational(-1, 2), SYMBOLS) == "(1 / math.sqrt(self.head_k))"
    assert print_torch(sympy.Max(fn("sigmoid")(ex.linear(x, "W")), sympy.Rational(1, 3)), SYMBOLS, {"x"}, SCALAR) == "torch.clamp(torch.sigmoid(self.W(x)), min=1/3)"
    assert print_torch(sympy.Min(x, h), SYMBOLS, {"x", "h"}) in ("torch.minimum(x, h)", "torch.minimum(h, x)")


def test_printed_code_computes_what_the_expression_says():
    """Run the printed code of a gate on tensors and compare with the formula done by hand."""
    gen = torch.Generator().manual_seed(0)

    class Owner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.heads, self.head_k, self.hidden = 3, 2, 5
            self.W_1 = torch.nn.Linear(5, 4, bias=False)
            self.W_2 = torch.nn.Linear(4, 6, bias=False)

    self = Owner().double()
    xs = torch.randn(2, 7, 5, generator=gen, dtype=torch.float64)
    expr = sympy.Max(-fn("softplus")(ex.linear(fn("tanh")(ex.linear(x, "W_1", 4)), "W_2")) * sympy.sqrt(h + 1), -3)
    code = print_torch(expr, {**SYMBOLS, "x": "xs"}, {"x", "h"}, PER_KEY)
    hh = torch.arange(3, dtype=torch.float64)[:, None]
    import math  # noqa: F401 - the printed code may use math
    import torch.nn.functional as F  # noqa: N812
    got = eval(code, {"torch": torch, "F": F, "math": math}, {"self": self, "xs": xs, "h": hh})  # test-side check of emitted text
    want = torch.clamp(-F.softplus(self.W_2(torch.tanh(self.W_1(xs))).view(2, 7, 3, 2)) * torch.sqrt(hh + 1), min=-3)
    torch.testing.assert_close(got, want)


def test_printer_never_evaluates_and_rejects_foreign_names(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the printer evaluated text")

    evil = sympy.Symbol("__import__('os').system('echo pwned')")
    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)
    monkeypatch.setattr(sympy, "sympify", refuse)
    with pytest.raises(ValueError, match="unknown name"):
        print_torch(fn("sigmoid")(evil), SYMBOLS, {"x"})
    with pytest.raises(ValueError, match="not a plain identifier"):
        print_torch(ex.linear(x, "W; import os"), SYMBOLS, {"x"}, SCALAR)
    with pytest.raises(ValueError, match="not a plain identifier"):
        print_torch(x, {**SYMBOLS, "a b": "1"}, {"x"})
    with pytest.raises(ValueError, match="unknown function"):
        print_torch(sympy.Function("system")(x), SYMBOLS, {"x"})
    # the whole layer context is built without eval, too
    ctx = modules.layer_context(*_ir_and_lsm(SPECS / "lsm" / "rwkv7.lsm"), header="#")
    assert "W_w2" in [p.weight for p in ctx.projections]


def _ir_and_lsm(path):
    ir = lmoec.compile_spec(path).ir
    return ir, ir.lsm()


# ---- bad arguments --------------------------------------------------------------------------


def test_bad_layer_arguments_raise_value_error():
    prog = _compiled(SPECS / "lsm" / "gla.lsm")
    with pytest.raises(ValueError, match="pass hidden="):
        prog.layer()
    with pytest.raises(ValueError, match="pass heads="):
        prog.layer(hidden=64)
    with pytest.raises(ValueError, match="not a multiple of heads"):
        prog.layer(hidden=64, heads=5)
    with pytest.raises(ValueError, match="heads must be a positive int"):
        prog.layer(hidden=64, heads=0)
    with pytest.raises(ValueError, match="layer_idx"):
        prog.layer(hidden=64, heads=4, layer_idx=-1)
    with pytest.raises(ValueError, match="no lsm named"):
        prog.layer("nope", hidden=64, heads=4)
    layer = prog.layer(hidden=64, heads=4)
    with pytest.raises(ValueError, match=r"x must be \[B, T, hidden=64\]"):
        layer(torch.randn(2, 3, 32))
    with pytest.raises(ValueError, match="past must be the cache"):
        layer(torch.randn(2, 3, 64), past={"conv": 1})
    with pytest.raises(ValueError, match="state must have shape"):
        layer(torch.randn(2, 1, 64), past={"state": torch.zeros(2, 4, 3, 3)})
    with pytest.raises(ValueError, match="unknown backend"):
        layer(torch.randn(2, 3, 64), backend="nope")


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(decay=Decay(kind="scalar", expr=fn("sigmoid")(k))), "unknown name 'k'"),
        (dict(delta=Delta(beta=fn("sigmoid")(ex.linear(q, "W")))), "projections read x"),
        (dict(decay=Decay(kind="scalar", expr=fn("sigmoid")(ex.linear(x, "W"))), delta=Delta(beta=fn("sigmoid")(ex.linear(x, "W", 4)))), "projection W is used as"),
        (dict(decay=Decay(kind="scalar", expr=ex.linear(x, "W") * sympy.Symbol("nope"))), "unknown name 'nope'"),
        (dict(decay=Decay(kind="constant", expr=ex.linear(x, "W"))), "constant decay reads only"),
        (dict(decay=Decay(kind="scalar", expr=fn("sigmoid")(ex.linear(x, "W"))), tie_k_to_decay=True), "needs a vector decay"),
        (dict(feature_map_q=["taylor2"]), "the op needs them equal"),
        (dict(params={"q_proj": Param(name="q_proj", shape=["H"], init=sympy.Integer(0))}), "reserved"),
        (dict(params={"w": Param(name="w", shape=["H", "T"], init=sympy.Integer(0))}), "unknown dimension"),
        (dict(decay=Decay(kind="vector", expr=fn("logsigmoid")(ex.linear(x, "W_g"))), bonus_u=True), "bonus u needs a declared parameter"),
        (dict(output_gate=fn("sigmoid")(ex.linear(x, "forward"))), "is taken"),
    ],
)
def test_specs_the_layer_cannot_build_raise_value_error(fields, message):
    """The emitter's own checks (behind the validate pass, which catches most of these first with a spec location)."""
    ir = classify(SpecIR(name="t_bad", source="<test>", lsms={"t": lsm(**fields)}))
    with pytest.raises(ValueError, match=message):
        modules.emit_layers(ir)


def test_model_defaults_without_heads_on_the_lsm():
    model = ModelSpec(name="m", vocab=16, hidden=24, layers=2, heads=3, pattern="LL", lsm="t", ffn=DenseFFNSpec(ffn=32))
    layer = program_of(lsm(decay=Decay(kind="scalar", expr=fn("logsigmoid")(ex.linear(x, "W_g")))), model=model).layer(layer_idx=1)
    assert (layer.hidden, layer.heads, layer.layer_idx, layer.layers) == (24, 3, 1, 2)
    assert layer(torch.randn(1, 3, 24)).shape == (1, 3, 24)
