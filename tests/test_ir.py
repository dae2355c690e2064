"""The IR core: expression JSON round trips, the oracle, the op contract, the comm plan."""
import json
import math

import pytest
import sympy
import torch

from lmoec.backends.reference import recurrent_reference
from lmoec.ir import expr as ex
from lmoec.ir.nodes import Decay, Delta, Family, LSMSpec, Recurrence, SpecIR
from lmoec.passes import run_passes
from lmoec.runtime.contract import check_op_args


def test_expression_json_round_trip():
    x, h, H = sympy.symbols("x h H")
    e = ex.function("logsigmoid")(ex.linear(ex.linear(x, "W_a", 16), "W_b")) / 16 + sympy.log(1 - 2 ** (-5 - h)) * sympy.Max(H, 2)
    tree = ex.to_json(e)
    assert ex.from_json(json.loads(json.dumps(tree))) == e
    assert ex.free_names(e) == {"x", "h", "H"}
    assert [str(l.args[1]) for l in ex.linears(e)] == ["W_a", "W_b"]


def test_expression_json_rejects_unknown_ops():
    with pytest.raises(ValueError):
        ex.from_json({"op": "__import__", "args": ["os"]})


def test_expression_bounds():
    """Interval bounds of spec expressions: what decides whether a decay can leave a kernel's exp() range."""
    x, K, A = sympy.symbols("x K A_log")
    lin = ex.linear(x, "W")
    f = ex.function
    inf = float("inf")
    cases = {
        -0.606531 * f("sigmoid")(lin): (-0.606531, 0.0),  # RWKV7's log decay
        f("logsigmoid")(lin) / 16: (-inf, 0.0),  # GLA's
        -f("softplus")(lin) * sympy.exp(A): (-inf, 0.0),  # Mamba2's / Gated DeltaNet's
        2 * f("tanh")(lin) - 1: (-3.0, 1.0),
        sympy.Max(f("logsigmoid")(lin), -2): (-2.0, 0.0),
        sympy.Min(f("logsigmoid")(lin), -0.5): (-inf, -0.5),
        1 / K: (0.0, 1.0),
        sympy.Integer(3): (3.0, 3.0),
        f("relu")(lin) ** 2: (0.0, inf),
        lin - lin + x: (-inf, inf),
        sympy.log(1 - 2 ** (-sympy.Symbol("h") - 5)): (math.log(31 / 32), 0.0),  # RetNet's constant decay
        -2 ** ((-8 * sympy.Symbol("h") - 8) / sympy.Symbol("H")): (-1.0, 0.0),  # Lightning's
        sympy.Integer(10) ** (1000 * x): (0.0, inf),
    }
    for expr, want in cases.items():
        got = ex.bounds(expr)
        assert got == pytest.approx(want), f"{expr}: {got} != {want}"
    # float arithmetic that overflows or meets inf - inf gives the whole line (sound), never an exception or NaN
    overflowing = [sympy.Pow(sympy.Float(1e-30), -20, evaluate=False), sympy.Pow(10, sympy.Float(3e38), evaluate=False),
                   f("elu")(sympy.exp(sympy.Float(88.0) * sympy.exp(K), evaluate=False)),
                   sympy.Add(sympy.exp(sympy.exp(lin), evaluate=False), -sympy.exp(sympy.exp(lin), evaluate=False),
                             evaluate=False)]
    for expr in overflowing:
        lo, hi = ex.bounds(expr)
        assert lo <= hi, expr    # sound on samples: every value lies inside the bounds
    w = torch.linspace(-40, 40, 801, dtype=torch.float64)
    samples = {-0.606531 * f("sigmoid")(lin): -0.606531 * torch.sigmoid(w),
               f("logsigmoid")(lin) / 16: torch.nn.functional.logsigmoid(w) / 16,
               2 * f("tanh")(lin) - 1: 2 * torch.tanh(w) - 1,
               f("silu")(lin): torch.nn.functional.silu(w), f("elu")(lin): torch.nn.functional.elu(w)}
    for expr, values in samples.items():
        lo, hi = ex.bounds(expr)
        assert lo <= values.min().item() and values.max().item() <= hi, expr

def test_ir_json_round_trip():
    ir = SpecIR(name="t", source="<test>", lsms={"t": LSMSpec(name="t", decay=Decay(kind="scalar", expr=ex.function("logsigmoid")(ex.linear(sympy.Symbol("x"), "W")) / 16), delta=Delta(beta=ex.function("sigmoid")(ex.linear(sympy.Symbol("x"), "W_b"))))})
    ir = run_passes(ir)
    again = SpecIR.model_validate_json(ir.dump())
    assert again == ir
    assert again.lsms["t"].recurrence.family is Family.delta


@pytest.mark.parametrize(
    "rec,family",
    [
        (Recurrence(), Family.additive),
        (Recurrence(decay="constant"), Family.constant),
        (Recurrence(decay="scalar"), Family.scalar),
        (Recurrence(decay="vector", bonus=True), Family.vector),
        (Recurrence(decay="vector", delta=True), Family.delta),
        (Recurrence(decay="vector", dplr=True), Family.dplr),
    ],
)
def test_family_of_recurrence(rec, family):
    assert rec.family is family


def test_reference_additive_matches_closed_form():
    """S_t = sum_{s<=t} k_s v_s^T, so o_t = scale * sum_{s<=t} (q_t.k_s) v_s: causal linear attention."""
    torch.manual_seed(0)
    B, T, H, K, V = 2, 9, 3, 4, 5
    q, k = torch.randn(2, B, T, H, K, dtype=torch.float64)
    v = torch.randn(B, T, H, V, dtype=torch.float64)
    o, S = recurrent_reference(Recurrence(), q, k, v, scale=0.5, output_final_state=True)
    att = torch.einsum("bthk,bshk->bhts", q, k).tril()
    expected = 0.5 * torch.einsum("bhts,bshv->bthv", att, v)
    torch.testing.assert_close(o, expected)
    torch.testing.assert_close(S, torch.einsum("bthk,bthv->bhkv", k, v))


def test_reference_scalar_decay_matches_closed_form():
    torch.manual_seed(1)
    B, T, H, K, V = 1, 7, 2, 3, 4
    q, k = torch.randn(2, B, T, H, K, dtype=torch.float64)
    v = torch.randn(B, T, H, V, dtype=torch.float64)
    g = -torch.rand(B, T, H, dtype=torch.float64)
    o, _ = recurrent_reference(Recurrence(decay="scalar"), q, k, v, g=g, scale=1.0)
    b = g.cumsum(1)  # [B,T,H]
    decay = (b[:, :, None, :] - b[:, None, :, :]).permute(0, 3, 1, 2)  # [B,H,t,s]
    att = torch.einsum("bthk,bshk->bhts", q, k) * torch.exp(decay).tril()
    torch.testing.assert_close(o, torch.einsum("bhts,bshv->bthv", att.tril(), v))


def test_contract_names_the_bad_argument():
    rec = Recurrence(decay="vector")
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="g is required"):
        check_op_args(rec, "gla", q, q, q)
    with pytest.raises(ValueError, match=r"g must have shape \[1, 8, 2, 4\]"):
        check_op_args(rec, "gla", q, q, q, g=torch.randn(1, 8, 2))
    with pytest.raises(ValueError, match="beta is not accepted"):
        check_op_args(rec, "gla", q, q, q, g=q, beta=q[..., 0])
    with pytest.raises(ValueError, match="initial_state must have shape"):
        check_op_args(rec, "gla", q, q, q, g=q, initial_state=torch.zeros(1, 2, 4, 5))


def test_lsm_payload_does_not_depend_on_sequence_length():
    ir = SpecIR(name="t", source="<test>", lsms={"t": LSMSpec(name="t", decay=Decay(kind="vector", expr=ex.linear(sympy.Symbol("x"), "W")))})
    steps = run_passes(ir).comm.steps
    assert steps and all(not s.depends_on_seq_len for s in steps)
    T = sympy.Symbol("T")
    assert all(T not in s.bytes_per_rank.free_symbols for s in steps)
    B, H, K, V = sympy.symbols("B H K V")
    assert sympy.simplify(steps[0].bytes_per_rank - 4 * (B * H * K + B * H * K * V)) == 0
