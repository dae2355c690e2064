"""Device mesh layouts: the degrees a ParallelSpec gets on a world size, and clear errors for impossible ones.

Building a real mesh over 4 gloo processes (and running LASP-2 in its sp
subgroups) is checked in tests/test_lasp2.py::test_lasp2_inside_mesh_sp_subgroups,
inside the spawned run it already pays for.
"""
import pytest

from lmoec.ir.nodes import ParallelSpec, SourceLoc
from lmoec.trainer.mesh import check_layout


@pytest.mark.parametrize(
    "spec,world,want",
    [
        (ParallelSpec(), 1, {"dp": 1, "sp": 1, "ep": 1}),
        (ParallelSpec(sp=2), 2, {"dp": 1, "sp": 2, "ep": 1}),
        (ParallelSpec(sp=2), 8, {"dp": 4, "sp": 2, "ep": 1}),  # dp left at 1 takes what is left
        (ParallelSpec(dp=2, sp=2, ep=2), 8, {"dp": 2, "sp": 2, "ep": 2}),
        (ParallelSpec(ep=4), 4, {"dp": 1, "sp": 1, "ep": 4}),
    ],
)
def test_layout_degrees(spec, world, want):
    assert check_layout(spec, world, seq_len=64, experts=8, batch_size=8) == want


@pytest.mark.parametrize(
    "spec,world,kwargs,message",
    [
        (ParallelSpec(sp=3), 4, {}, r"sp \* ep = 3 \* 1 = 3 does not divide the world size 4"),
        (ParallelSpec(sp=2, ep=2), 6, {}, r"does not divide the world size 6"),
        (ParallelSpec(dp=2, sp=2), 8, {}, r"dp \* sp \* ep = 2 \* 2 \* 1 = 4 != world size 8"),
        (ParallelSpec(sp=4), 4, {"seq_len": 30}, r"sp = 4 does not divide the sequence length 30"),
        (ParallelSpec(ep=4), 4, {"experts": 6}, r"ep = 4 does not divide the expert count 6"),
        (ParallelSpec(ep=2), 4, {"batch_size": 3}, r"dp \* ep = 4 .* batch size 3"),
        (ParallelSpec(tp=2), 2, {}, r"tp = 2 is not supported"),
        (ParallelSpec(sp=0), 2, {}, r"sp = 0 must be >= 1"),
    ],
)
def test_impossible_layouts_say_why(spec, world, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_layout(spec, world, **kwargs)


def test_layout_error_names_the_spec_line():
    spec = ParallelSpec(sp=3, loc=SourceLoc(file="m.lsm", line=12, col=3))
    with pytest.raises(ValueError, match=r"m\.lsm:12:3"):
        check_layout(spec, 4)
