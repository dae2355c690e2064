"""Issue 16, the command line: no command loses a user's files, every flag is checked before any work, any
OSError or Ctrl-C is one line, and `check` stays light (no torch).

Each reproducer asserts the exit status, that there is no traceback, and (snapshotting the folder before and
after) that nothing was written or deleted that should not have been.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lmoec.cli import main
from lmoec.output import OutputError, package_files, write_files
from lmoec.paths import GENERATED, ROOT, SPECS

GLA = SPECS / "lsm" / "gla.lsm"
TINY = SPECS / "models" / "tiny.lsm"
SMALL = f"""
import "{GLA}"
model small {{
    vocab = 256  hidden = 32  layers = 2  heads = 2  pattern = "LN"  lsm = gla
    moe {{ experts = 4 top_k = 2 expert_ffn = 32 }}
}}
"""


def lmoec(*args, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "lmoec", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, **kwargs)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file and folder under `folder`, with file contents (folders map to b'/')."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"/") for p in sorted(folder.rglob("*"))}


def one_line_error(r, status: int = 2) -> str:
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """`lmoec ARGV` in this process: (exit status, stderr); argparse's own exits included."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as stop:
        status = stop.code
    return status, capsys.readouterr().err


@pytest.fixture(scope="module")
def small_spec(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "small.lsm"
    path.write_text(SMALL)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(Path(json.__file__).read_text() * 2)
    return path


# ---- compile -o: nothing lmoec did not write is lost --------------------------------------------------------


def test_compile_refuses_a_folder_it_did_not_write_and_force_keeps_other_files(tmp_path):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "data" / "x.bin").write_bytes(b"\0\1")
    before = snapshot(tmp_path)
    err = one_line_error(lmoec("compile", GLA, "-o", out, cwd=tmp_path))
    assert "is not empty and lmoec did not write it" in err and "notes.txt" in err and "--force" in err
    assert snapshot(tmp_path) == before

    r = lmoec("compile", GLA, "-o", out, "--force", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (out / "notes.txt").read_text() == "mine" and (out / "data" / "x.bin").read_bytes() == b"\0\1"
    assert package_files(out) >= {"__init__.py", "ir.json", "gla_ops.py"}


def test_compile_refuses_a_file_and_the_current_folder(tmp_path):
    spec = tmp_path / "my.lsm"
    shutil.copy(GLA, spec)
    before = snapshot(tmp_path)
    for out in ("my.lsm", "my.lsm/sub", "."):
        err = one_line_error(lmoec("compile", spec, "-o", out, cwd=tmp_path))
        assert ("is a file, not a folder" in err) if out != "." else ("./ is not empty" in err)
        assert snapshot(tmp_path) == before


def test_compile_updates_its_own_package_in_place(tmp_path):
    """A package lmoec wrote is updated without --force: files it wrote that the new spec lacks go, the user's
    stay; the new files are readable by others (umask), not private like a mkdtemp folder."""
    out = tmp_path / "pkg"
    assert lmoec("compile", TINY, "-o", out, cwd=tmp_path).returncode == 0
    assert {"model.py", "moe.py", "config.json"} <= set(os.listdir(out))
    (out / "notes.txt").write_text("mine")
    (out / "__pycache__").mkdir()
    (out / "__pycache__" / "x.pyc").write_bytes(b"cache")
    r = lmoec("compile", GLA, "-o", out, cwd=tmp_path)  # an lsm-only spec into the model's package folder
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == sorted(["__init__.py", "gla_layer.py", "gla_ops.py", "gla_torch.py",
                                              "gla_triton.py", "ir.json", "notes.txt", "__pycache__"])
    assert (out / "__pycache__" / "x.pyc").read_bytes() == b"cache"
    assert json.loads((out / "ir.json").read_text())["name"] == "gla"
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask
    assert all((p.stat().st_mode & 0o777) == 0o666 & ~umask for p in out.glob("*.py"))
    assert not [p for p in tmp_path.rglob(".*")], "no temporary file or folder left"


def test_committed_packages_are_recognised_as_lmoec_packages():
    """`lmoec compile specs/lsm/*.lsm specs/models/*.lsm` must keep updating generated/ without --force."""
    for spec in sorted(SPECS.rglob("*.lsm")):
        folder = GENERATED / spec.stem
        assert package_files(folder) == {p.name for p in folder.iterdir() if p.is_file()}, folder


def test_failed_update_keeps_the_old_package_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    out = tmp_path / "pkg"
    write_files(out, {"__init__.py": "# Generated by lmoec: old\n", "a.py": "# Generated by lmoec: old a\n"}, None)
    before = snapshot(tmp_path)

    def full_disk(src, dst):
        raise OSError(28, "No space left on device", str(src))

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OutputError, match="cannot write .*No space left on device"):
        write_files(out, {"__init__.py": "# Generated by lmoec: new\n", "a.py": "new"}, package_files(out))
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs /sys, a folder nobody can create files in (root neither)")
def test_compile_into_an_unwritable_folder(tmp_path):
    err = one_line_error(lmoec("compile", GLA, "-o", "/sys/lmoec-test", cwd=tmp_path))
    assert err.startswith("error: cannot write /sys/lmoec-test/")
    assert not Path("/sys/lmoec-test").exists() and not list(tmp_path.iterdir())


def test_a_300_character_name_is_one_clear_error(tmp_path):
    (tmp_path / "long.lsm").write_text(GLA.read_text().replace("lsm gla ", f"lsm {'a' * 300} "))
    before = snapshot(tmp_path)
    for args in (["compile", "long.lsm"], ["compile", "long.lsm", "-o", "a/b/out"]):
        r = lmoec(*args, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "error" in r.stderr, r.stderr
        assert snapshot(tmp_path) == before, "no folder (nor its parents) left behind"


def test_several_specs_are_all_checked_before_any_is_written(tmp_path):
    (tmp_path / "out" / "bla").mkdir(parents=True)
    (tmp_path / "out" / "bla" / "mine.txt").write_text("x")
    before = snapshot(tmp_path)
    err = one_line_error(lmoec("compile", GLA, SPECS / "lsm" / "bla.lsm", "-o", "out", cwd=tmp_path))
    assert "out/bla/ is not empty" in err
    assert snapshot(tmp_path) == before, "gla was not written either"
    (tmp_path / "other").mkdir()
    shutil.copy(GLA, tmp_path / "other" / "gla.lsm")
    err = one_line_error(lmoec("compile", GLA, "other/gla.lsm", "-o", "two", cwd=tmp_path))
    assert "two specs compile to the package 'gla'" in err and not (tmp_path / "two").exists()


# ---- variants -o: the README's command keeps the committed sweep and notes ----------------------------------


def test_readme_variants_command_keeps_what_it_did_not_write(tmp_path, capsys):
    sweep = tmp_path / "recall-sweep"
    shutil.copytree(ROOT / "examples" / "recall-sweep", sweep)
    committed = snapshot(sweep)
    ours = {"manifest.json"} | {v["spec"] for v in json.loads((sweep / "manifest.json").read_text())["variants"]}
    readme_command = ["variants", SPECS / "models" / "recall.lsm", "--vary", "lsm=bla,retnet,gla,deltanet,gated_deltanet",
                      "--vary", "pattern=LL,LN", "--vary", "lsm.short_conv=4", "-o", sweep]
    assert run_main(readme_command, capsys)[0] == 0
    after = snapshot(sweep)
    assert set(after) == set(committed)
    assert {k: v for k, v in after.items() if k not in ours} == {k: v for k, v in committed.items() if k not in ours}

    (sweep / "recall__lsm_gla__pattern_LL__short_conv_4.lsm").write_text("# my own spec now\n")
    assert run_main(readme_command[:2] + ["--vary", "lsm=bla", "-o", sweep], capsys)[0] == 0
    left = set(snapshot(sweep)) - set(committed)
    assert left == {"recall__lsm_bla.lsm"}, left
    gone = set(committed) - set(snapshot(sweep))
    assert gone == ours - {"manifest.json", "recall__lsm_gla__pattern_LL__short_conv_4.lsm"}, \
        "the old grid's specs go, except one the user rewrote; README.md and sweep-mqar/ stay"


def test_variants_refuses_a_foreign_folder_and_leaves_nothing_on_failure(tmp_path, small_spec):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    (tmp_path / "file.txt").write_text("x")
    before = snapshot(tmp_path)
    for out in ("mine", "file.txt", "."):
        err = one_line_error(lmoec("variants", small_spec, "--vary", "pattern=LL", "-o", out, cwd=tmp_path))
        assert "is not empty" in err or "is a file" in err
        assert snapshot(tmp_path) == before
    r = lmoec("variants", small_spec, "--vary", "lsm=gla,no_such_lsm", "-o", "new/v", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no_such_lsm" in r.stderr, r.stderr
    assert snapshot(tmp_path) == before, "the folder made for the first point is gone"


def test_sweep_results_survive_rerunning_variants_and_a_second_corpus_sweep_is_refused(small_spec, corpus, tmp_path,
                                                                                       capsys):
    v = tmp_path / "v"
    assert run_main(["variants", small_spec, "--vary", "lsm=bla,gla", "-o", v], capsys)[0] == 0
    sweep = ["sweep", v, "--task", "corpus", "--data", corpus, "--steps", "2", "--batch", "2", "--seq-len", "16"]
    assert run_main(sweep, capsys)[0] == 0
    results = {k: b for k, b in snapshot(v).items() if k.startswith("sweep-corpus")}
    assert "sweep-corpus/results.md" in results
    status, err = run_main(sweep, capsys)
    assert status == 2 and "already holds the runs of a corpus sweep" in err
    assert run_main(["variants", small_spec, "--vary", "lsm=gla", "-o", v], capsys)[0] == 0
    assert {k: b for k, b in snapshot(v).items() if k.startswith("sweep-corpus")} == results


# ---- every flag is checked before any work --------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad_data")
    paths = {"binary": d / "binary.bin", "empty_file": d / "empty.txt", "empty_dir": d / "empty", "binaries": d / "bins"}
    paths["binary"].write_bytes(bytes(range(256)) * 4)
    paths["empty_file"].write_bytes(b"")
    paths["empty_dir"].mkdir()
    paths["binaries"].mkdir()
    (paths["binaries"] / "a.bin").write_bytes(b"\0" * 100)
    return paths


BAD_FLAGS = [
    # (argv after the command's required arguments, a piece of the message)
    ("train", ["--seq-len", "0"], "--seq-len: expected a positive integer"),
    ("train", ["--steps", "-5"], "--steps: expected a positive integer"),
    ("train", ["--batch", "0"], "--batch: expected a positive integer"),
    ("train", ["--lr", "0"], "--lr: expected a positive finite number"),
    ("train", ["--lr", "nan"], "--lr: expected a positive finite number"),
    ("train", ["--lr", "inf"], "--lr: expected a positive finite number"),
    ("train", ["--warmup", "-1"], "--warmup: expected an integer >= 0"),
    ("train", ["--weight-decay", "-0.1"], "--weight-decay: expected a finite number >= 0"),
    ("train", ["--grad-clip", "0"], "--grad-clip: expected a positive"),
    ("train", ["--eval-every", "0"], "--eval-every: expected a positive integer"),
    ("train", ["--save-every", "0"], "--save-every: expected a positive integer"),
    ("train", ["--seed", "-1"], "--seed: expected a seed"),
    ("train", ["--sp", "0"], "--sp: expected a positive integer"),
    ("train", ["--device", "gpu0"], "--device 'gpu0' is not a device"),
    ("train", ["--data", "{binary}"], "looks binary"),
    ("train", ["--data", "{empty_file}"], "is empty"),
    ("train", ["--data", "{empty_dir}"], "no text files under"),
    ("train", ["--data", "{binaries}"], "no text files under"),
    ("train", ["--out", "{binary}"], "is a file, not a folder"),
    ("generate", ["--temperature", "-1"], "--temperature: expected a finite number >= 0"),
    ("generate", ["--temperature", "nan"], "--temperature: expected a finite number >= 0"),
    ("generate", ["--top-k", "0"], "--top-k: expected a positive integer"),
    ("generate", ["--top-k", "-1"], "--top-k: expected a positive integer"),
    ("generate", ["--top-p", "0"], "--top-p: expected a number in (0, 1]"),
    ("generate", ["--top-p", "1.5"], "--top-p: expected a number in (0, 1]"),
    ("generate", ["--max-new-tokens", "-1"], "--max-new-tokens: expected an integer >= 0"),
    ("generate", ["--seed", "-3"], "--seed: expected a seed"),
    ("generate", ["--device", "gpu0"], "--device 'gpu0' is not a device"),
    ("sweep", ["--steps", "0"], "--steps: expected a positive integer"),
    ("sweep", ["--batch", "-1"], "--batch: expected a positive integer"),
    ("sweep", ["--lr", "nan"], "learning rates must be positive finite numbers"),
    ("sweep", ["--lr", "1e-3,inf"], "learning rates must be positive finite numbers"),
    ("sweep", ["--seq-len", "0"], "--seq-len: expected a positive integer"),
    ("sweep", ["--pairs", "0"], "--pairs: expected a positive integer"),
    ("sweep", ["--pairs", "100"], "MQAR: 100 pairs and 100 queries need seq_len >= 400"),
    ("sweep", ["--vocab", "0"], "--vocab: expected a positive integer"),
    ("sweep", ["--jobs", "0"], "--jobs: expected a positive integer"),
    ("sweep", ["--seed", "-1"], "--seed: expected a seed"),
    ("sweep", ["--device", "gpu0"], "--device 'gpu0' is not a device"),
    ("sweep", ["--data", "{empty_file}"], "--data is for --task corpus"),
    ("sweep", ["--task", "corpus", "--data", "{binary}"], "looks binary"),
    ("sweep", ["-o", "{binary}"], "is a file, not a folder"),
    ("bench", ["--tokens", "0"], "--tokens: expected a positive integer"),
    ("bench", ["--iters", "0"], "--iters: expected a positive integer"),
    ("bench", ["--rounds", "-2"], "--rounds: expected a positive integer"),
    ("bench", ["--threads", "0"], "--threads: expected a positive integer"),
    ("bench", ["--budget", "0"], "--budget: expected a positive finite number"),
    ("bench", ["--budget", "nan"], "--budget: expected a positive finite number"),
    ("bench", ["--lengths", "0"], "bad length"),
    ("bench", ["--what", "speed"], "unknown --what"),
    ("bench", ["-o", "{binary}"], "is a file, not a folder"),
    ("variants", ["--vary", "colour=red"], "unknown axis 'colour'"),
    ("variants", ["--vary", "pattern=LL", "-o", "{binary}"], "is a file, not a folder"),
    ("inspect", ["--shape", "1,2,x"], "--shape expects five positive integers"),
    ("inspect", ["--stats"], "--stats goes with --kernels"),
    ("inspect", ["--kernels", "--stats", "--gpu", "a100x"], "unknown --gpu 'a100x'"),
    ("compile", ["-o", "{binary}"], "is a file, not a folder"),
]


@pytest.mark.parametrize("command, flags, message", BAD_FLAGS, ids=[f"{c} {' '.join(f)}" for c, f, _ in BAD_FLAGS])
def test_bad_flags_stop_the_command_before_any_work(command, flags, message, bad_data, small_spec, tmp_path,
                                                    monkeypatch, capsys):
    """In process (a subprocess per flag would cost a minute): exit 2, one line naming the flag, nothing
    written. The required arguments are valid, or missing where the flag must be checked first."""
    monkeypatch.chdir(tmp_path)
    required = {"train": [small_spec], "generate": [tmp_path / "no-run", "--prompt", "x"],
                "sweep": [tmp_path / "no-manifest.json"], "bench": [small_spec], "variants": [small_spec],
                "inspect": [small_spec], "compile": [small_spec]}[command]
    flags = [f.format(**bad_data) for f in flags]
    status, err = run_main([command, *required, *flags], capsys)
    assert status == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir()), "nothing written"


def test_spec_arguments_name_a_directory_or_a_missing_file(tmp_path, capsys):
    for argv, message in ((["check", SPECS], f"{SPECS}: error: is a directory, not a file"),
                          (["check", tmp_path / "nope.lsm"], f"{tmp_path / 'nope.lsm'}: error: no such file"),
                          (["inspect", SPECS], "is a directory"), (["compile", SPECS], "is a directory"),
                          (["variants", SPECS, "--vary", "pattern=LL"], "is a directory")):
        status, err = run_main(argv, capsys)
        assert status == 2 and (err.strip() == message if argv[0] == "check" else message in err), err
        assert len(err.strip().splitlines()) == 1, err


def test_check_reports_each_spec_and_fails_if_any_failed(tmp_path, capsys):
    assert main(["check", str(GLA), str(tmp_path / "nope.lsm"), str(TINY)]) == 2
    out = capsys.readouterr()
    assert "gla.lsm: ok" in out.out and "tiny.lsm: ok" in out.out and "nope.lsm: error: no such file" in out.err


def test_ctrl_c_in_any_command_is_one_line_and_status_130(monkeypatch, capsys):
    from lmoec.cli import check

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(check, "run", interrupted)
    assert run_main(["check", GLA], capsys) == (130, "lmoec check: interrupted\n")


# ---- Ctrl-C during training ---------------------------------------------------------------------------------


def test_ctrl_c_during_train_saves_the_step_and_resume_is_bit_exact(small_spec, corpus, tmp_path):
    """SIGINT mid-run: one line, status 130, the checkpoint holds the last whole step; resuming from it ends
    with the same weights as a run never interrupted (every run through the command, same threads)."""
    import torch

    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "lmoec", "train", str(small_spec), "--data", str(corpus), "--steps", "12",
            "--seq-len", "16", "--batch", "2", "--eval-every", "1", "--no-progress"]
    straight = subprocess.Popen(base + ["--out", "straight"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    stopped = subprocess.Popen(base + ["--out", "stopped"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    for line in stopped.stdout:
        if line.startswith("step 2:"):
            stopped.send_signal(signal.SIGINT)
            break
    stopped.stdout.read()
    err = stopped.stderr.read()
    assert stopped.wait(timeout=120) == 130 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and "interrupted: stopped after step" in err and "--resume" in err, err
    step = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)["step"]
    assert 2 <= step < 12 and f"after step {step}," in err
    log = [json.loads(line) for line in (tmp_path / "stopped" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == step, "the log reaches the checkpoint's step"

    resumed = subprocess.run(base + ["--out", "stopped", "--resume"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert straight.wait(timeout=120) == 0, straight.stderr.read()
    a, b = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=True) for run in ("stopped", "straight"))
    assert a["step"] == b["step"] == 12
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"]), "resume after Ctrl-C is bit-exact"


# ---- latency: check and inspect do not import torch ---------------------------------------------------------

LIGHT = """
import sys
from lmoec.cli import build_parser, main
build_parser()
parsed = sorted(m for m in ("torch", "sympy", "jinja2") if m in sys.modules)
for argv in (["check", sys.argv[1]], ["inspect", sys.argv[1]], ["inspect", sys.argv[1], "--ir"],
             ["inspect", sys.argv[1], "--graph"], ["inspect", sys.argv[1], "--plan"]):
    assert main(argv) == 0
print(parsed, sorted(m for m in ("torch", "jinja2") if m in sys.modules))
"""


def test_check_and_inspect_do_not_import_torch(tmp_path):
    """`lmoec check` is a compiler's quick question: torch alone took 1.5 s of it. The command line itself
    (`lmoec --help`) imports neither torch nor sympy."""
    r = subprocess.run([sys.executable, "-c", LIGHT, str(TINY)], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[] []", r.stdout
