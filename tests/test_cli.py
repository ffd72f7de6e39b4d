"""The command line's front door: every stage's ``--help`` works, and ``--help`` and settings errors answer
before anything heavy loads (torch alone takes seconds), checked through ``sys.modules`` rather than a clock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.cli import STAGES, Stage, _parser
from pipeline.core.config import describe

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "basicsr", "cv2", "spandrel")  # seconds and hundreds of MB between them
ALSO_HEAVY = ("timm", "albumentations", "pandas", "matplotlib", "skimage")


ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # the checkout's package, whatever the folder a command runs in


def _pipeline(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=ENV)


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_help_prints_its_settings(name: str) -> None:
    done = _pipeline(name, "--help")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith(f"usage: python -m pipeline {name} ") and "settings (override with key=value):" in out
    stage = STAGES[name]
    for section in stage.sections:
        for key, _default, _help in describe(section):
            assert f"  {key}  " in out, f"{key} missing from {name} --help"
    flat = " ".join(out.split())  # argparse wraps the flags' help
    for flag, (key, _text) in stage.flags.items():
        assert flag in out and f"(= {key})" in flat


def test_help_prints_percent_signs_as_written() -> None:
    """argparse %-formats help strings: a setting or flag whose help says "95% interval" must not break
    ``--help`` (it once raised ``TypeError``), and a literal ``%(prog)s`` stays literal too."""
    stage = Stage("pipeline.nothing", "100% of %(prog)s", ("evaluate",),
                  {"--vs": ("evaluate.vs", "the gain with its 95% interval, %(default)s")},
                  lambda: "models: 50% %(prog)s")
    text = _parser("x", stage).format_help()
    assert "100% of %(prog)s" in text
    assert "the gain with its 95% interval, %(default)s (= evaluate.vs)" in " ".join(text.split())
    assert "models: 50% %(prog)s" in text
    assert "95% interval" in text  # evaluate.vs's own help, from the settings table


# Settings errors every stage reports from its config alone: unknown key, wrong type, out of bounds.
SETTINGS_ERRORS = (["no_such.key=1"], ["seed=abc"], ["seed=-1"], ["data.folds=1"])

# A missing folder (or file) each stage reads, given on the command line: reported before torch loads.
# {M}: a path that does not exist; {D}: an empty folder.
MISSING = {
    "add-data": [["--data", "{M}", "--from", "{D}"], ["--data", "{D}", "--from", "{M}"], ["--data", "{D}"]],
    "prepare": [["--data", "{M}"]],
    "patchify": [["--data", "{M}"]],
    "train": [["--data", "{M}"]],
    "infer": [["--data", "{M}"], ["--data", "{D}", "infer.split=val"], ["--input", "{M}", "--output", "{M}2"],
              ["--input", "{D}"], ["--weights", "{M}.pth", "--input", "{D}"]],
    "submit": [["--data", "{M}"], ["--check", "{M}.zip"]],
    "evaluate": [["--sr", "{M}", "--hr", "{D}"], ["--sr", "{D}", "--hr", "{M}"], ["--hr", "{D}"]],
    "ablate": [["--data", "{M}"]],
    "blend": [["--data", "{M}", "blend.name=b", "blend.members=[r1,r2]"], ["--data", "{M}"]],
    "mri-prepare": [["--volumes", "{M}"]],
    "mri-train": [["--volumes", "{M}"], ["--volumes", "{M}", "train.crop=8"]],
    "mri-cycle-train": [["--volumes", "{M}"]],
    "mri-infer": [["--volumes", "{M}"], ["--input", "{M}", "--output", "{M}2"]],
    "mri-evaluate": [["--volumes", "{M}"], ["--volumes", "{D}", "--sr", "{M}"]],
    "export": [["--weights", "{M}.pth"], ["--weights", "{D}"]],  # a missing weights file, a folder
}

# Runs in a fresh interpreter: each call of the CLI, then what it left in sys.modules.
PROBE = textwrap.dedent("""
    import contextlib, io, json, sys, sysconfig
    before = set(sys.modules)
    site = tuple({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    from pipeline.cli import main
    calls, out = json.loads(sys.argv[1]), []
    for argv in calls:
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse's --help
                code = exc.code
        new = set(sys.modules) - before
        loaded = sorted({m.split(".")[0] for m in new})
        installed = sorted({m.split(".")[0] for m in new  # packages from site-packages, not the standard library
                            if str(getattr(sys.modules[m], "__file__", None) or "").startswith(site)})
        out.append({"argv": argv, "code": code, "err": err.getvalue(), "loaded": loaded, "installed": installed})
    print(json.dumps(out))
""")


def _probe(calls: list[list[str]], cwd: Path) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(calls)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_help_and_settings_errors_load_nothing_heavy(tmp_path: Path) -> None:
    """``--help`` and the settings errors of every stage import only the standard library, yaml and the
    project's light modules; then each stage's missing folders are reported before torch, OpenCV, pandas ...
    load. Each call's error is one line."""
    light = [[name, "--help"] for name in STAGES] + [[name, *e] for name in STAGES for e in SETTINGS_ERRORS]
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = str(tmp_path / "missing")
    folders = [[name, *(a.replace("{M}", missing).replace("{D}", str(empty)) for a in argv)]
               for name, cases in MISSING.items() for argv in cases]
    for name, stage in STAGES.items():  # every stage that reads a dataset, a volume folder or a weights file
        assert name in MISSING or not {"--data", "--volumes", "--weights"} & set(stage.flags), name
    results = _probe(light + folders, tmp_path)
    for r in results[:len(light)]:
        assert r["code"] == (0 if r["argv"][-1] == "--help" else 2), r
        assert set(r["installed"]) <= {"yaml", "_yaml"}, f"{r['argv']} loaded {r['installed']}"
    for r in results[len(light):]:
        assert r["code"] == 2, r
        heavy = sorted(set(r["loaded"]) & {*HEAVY, *ALSO_HEAVY})
        assert not heavy, f"{r['argv']} loaded {heavy}"
    for r in results:
        if r["code"]:
            assert r["err"].startswith("error: ") and r["err"].count("\n") == 1, r
    assert not (tmp_path / "missing").exists() and not (tmp_path / "missing2").exists()


@pytest.mark.parametrize("argv, says", [
    (["infer", "infer.tilee=64"], "unknown config key 'infer.tilee'"),
    (["train", "train.batch_size=many"], "train.batch_size"),
    (["evaluate", "data.scale=0"], "data.scale=0"),
    (["prepare", "--data", "nowhere"], "nowhere: data folder not found (--data)"),
    (["infer", "--weights", "nowhere.pth", "--input", "."], "nowhere.pth: checkpoint not found"),
])
def test_a_settings_error_is_one_line_and_a_nonzero_exit(argv: list[str], says: str, tmp_path: Path) -> None:
    done = _pipeline(*argv, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and says in done.stderr, done.stderr
