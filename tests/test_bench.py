"""`lmoec bench`: a micro run of every figure on CPU writes its table and plot; decode cache bytes are
constant for a pure LSM stack and grow with the context for attention; bad arguments are one-line errors.

Timings themselves are not asserted (speed is shown by bench/, never by tests).
"""
from __future__ import annotations

import pytest

from lmoec.bench import KERNEL_LSMS, best_of, SIZES, BenchConfig, parse_lengths, parse_what, resolve, run_bench, write_outputs
from lmoec.cli import main
from lmoec.paths import SPECS

LENGTHS = [16, 32]
CONTEXTS = [32, 128, 512]
VARIANTS = ["GLA", "attention baseline"]


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig(size="tiny", lengths=LENGTHS, contexts=CONTEXTS, variants=VARIANTS, device="cpu", iters=1,
                      tokens=512, rounds=2)
    result = run_bench(cfg, say=lambda _: None)
    written = write_outputs(result, out)
    return result, out, written


def table(md: str, heading: str) -> list[list[str]]:
    """The cells of the Markdown table under the heading that starts with `heading`."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## " + heading))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_micro_run_writes_markdown_and_pngs(micro):
    result, out, written = micro
    assert sorted(p.name for p in written) == ["bench.md", "decode.png", "kernels.png", "train.png"]
    for name in ("train.png", "decode.png", "kernels.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    md = (out / "bench.md").read_text()
    assert "torch " in md and "Triton " in md and "CPU" in md and "load average" in md
    assert "FAILED" not in md

    train = table(md, "Training")
    assert train[0] == ["model", "16 x 32", "32 x 16", "change first -> last", "LSM backend"]  # 512 tokens per step
    assert [r[0] for r in train[2:]] == VARIANTS
    for row in train[2:]:
        assert len(row) == len(train[0]) and all(c.endswith("tok/s, n/a") for c in row[1:3])

    decode = table(md, "Decoding")
    assert decode[0] == ["model", *map(str, CONTEXTS)]
    assert [r[0] for r in decode[2:]] == VARIANTS
    assert all("ms, cache" in c and c.endswith("peak n/a") for r in decode[2:] for c in r[1:])

    kernels = table(md, "Kernel")
    ops = [f"lmoec {lsm}" for lsm in KERNEL_LSMS]  # tiny.lsm's own LSM, gla, is one of them
    expected = [(str(T), op) for T in LENGTHS for op in [*ops, "SDPA causal"]]
    assert [(r[0], r[2]) for r in kernels[2:]] == expected
    for row in kernels[2:]:
        assert len(row) == 9 and row[7] == "n/a"
        assert float(row[4]) > 0 and float(row[5]) > 0  # fwd and fwd+bwd ran
    assert all(r["error"] == "" for r in result.kernels)


def test_kernel_batch_keeps_tokens_constant(micro):
    result, _, _ = micro
    tokens = {r["B"] * r["T"] for r in result.kernels}
    assert tokens == {SIZES["tiny"].kernel_tokens}


def test_decode_cache_constant_for_lsm_growing_for_attention(micro):
    result, _, _ = micro
    tiny = SIZES["tiny"]
    B, layers, H = tiny.decode_batch, tiny.model["layers"], tiny.model["heads"]
    D = tiny.model["hidden"] // H
    by = {(r["model"], r["context"]): r["cache_bytes"] for r in result.decode}
    lsm = [by["GLA", c] for c in CONTEXTS]
    assert len(set(lsm)) == 1 and lsm[0] > 0  # the fp32 states: one size at any context
    for c in CONTEXTS:  # keys and values of every layer, fp32, allocated once: the context and the decoded token
        assert by["attention baseline", c] == 2 * layers * B * H * (c + 1) * D * 4


def test_best_of_rounds_keeps_the_best_time_and_throughput():
    rounds = [[dict(op="a", T=8, fwd_ms=3.0, tok_s=10.0, peak=1.0, error=""),
               dict(op="b", T=8, fwd_ms=None, tok_s=None, peak=None, error="OOM")],
              [dict(op="a", T=8, fwd_ms=2.0, tok_s=12.0, peak=0.5, error=""),
               dict(op="b", T=8, fwd_ms=4.0, tok_s=9.0, peak=2.0, error="")],
              [dict(op="a", T=8, fwd_ms=5.0, tok_s=11.0, peak=3.0, error="")]]
    merged = best_of(rounds, ("op", "T"), higher=("tok_s", "peak"))
    assert merged == [dict(op="a", T=8, fwd_ms=2.0, tok_s=12.0, peak=3.0, error=""),
                      dict(op="b", T=8, fwd_ms=4.0, tok_s=9.0, peak=2.0, error="")]


def test_parse_lengths():
    assert parse_lengths("2K,4096, 8k") == [2048, 4096, 8192]
    for bad in ("0", "-5", "abc", "1.5", "", "2K,,4K", "K"):
        with pytest.raises(ValueError, match="bad length"):
            parse_lengths(bad)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="unknown --what bogus"):
        parse_what("train,bogus")
    with pytest.raises(ValueError, match="unknown --what"):
        resolve(BenchConfig(what=("decode", "speed"), device="cpu"))
    with pytest.raises(ValueError, match="unknown --size"):
        resolve(BenchConfig(size="huge", device="cpu"))
    with pytest.raises(ValueError, match="bad --tokens"):
        resolve(BenchConfig(tokens=0, device="cpu"))
    with pytest.raises(ValueError, match="bad --lengths"):
        resolve(BenchConfig(lengths=[64, 0], device="cpu"))
    with pytest.raises(ValueError, match="unknown variant"):
        resolve(BenchConfig(variants=["Mamba9"], device="cpu"))
    lsm_only = str(SPECS / "lsm" / "gla.lsm")
    with pytest.raises(ValueError, match="defines no model"):
        resolve(BenchConfig(spec=lsm_only, what=("train",), device="cpu"))
    resolve(BenchConfig(spec=lsm_only, what=("kernels",), device="cpu"))  # kernels need only an lsm


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["bench", "--what", "train,fast", "-o", str(out)]) == 2
    assert main(["bench", "--lengths", "1K,zero", "-o", str(out)]) == 2
    assert main(["bench", str(SPECS / "lsm" / "bla.lsm"), "--what", "decode", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert not out.exists()


def test_cli_decode_only(tmp_path, capsys):
    assert main(["bench", "--what", "decode", "--variants", "BLA", "--contexts", "16,64", "--iters", "1",
                 "--device", "cpu", "-o", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.md", "decode.png"]
    md = (tmp_path / "bench.md").read_text()
    assert [r[0] for r in table(md, "Decoding")[2:]] == ["BLA"] and "## Training" not in md
