"""The slug-fast command line: help, the demo job, machine-readable output, bad input."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import slug_fast
from slug_fast import digits
from slug_fast.adapters import get_adapter
from slug_fast.demo import demo_task
from slug_fast.eval import clip_membership_inference

SCRIPT = Path(sys.executable).with_name("slug-fast")


def run(*args, module=False):
    cmd = [sys.executable, "-m", "slug_fast", *args] if module else [str(SCRIPT), *args]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.skipif(not SCRIPT.exists(), reason=f"console script not installed beside {sys.executable}")
def test_help_from_the_console_script():
    out = run("--help")
    assert out.returncode == 0 and "demo" in out.stdout and "backends" in out.stdout


def test_demo_writes_a_report_and_a_delta(tmp_path):
    out = run("demo", "--forget", "4", "--out", str(tmp_path / "o"), "--epochs", "4", "--quiet", module=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report == json.loads((tmp_path / "o" / "report.json").read_text())
    written = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert written == ["delta", "pareto_text.png", "pareto_vision.png", "report.json", "report.md", "similarity.png"]
    assert (tmp_path / "o" / "pareto_vision.png").read_bytes()[:4] == b"\x89PNG"
    assert "| forget top1 |" in (tmp_path / "o" / "report.md").read_text()
    assert report["concept"] == "four" and report["forget"]["top1_after"] == 0.0
    assert report["forget"]["top1_before"] > 50
    assert set(report["forget"]) == {"top1_before", "top1_after", "top5_before", "top5_after"}
    assert set(report["retain"]) == {"top1_before", "top1_after"}
    assert {"gradients", "select", "search", "total"} <= set(report["seconds"])
    tensors, config = slug_fast.load_delta(tmp_path / "o" / "delta")
    assert list(tensors) == report["layer"] == config["layers"] and config["step"] == report["step"]
    # MIA recomputed here: the digit's training vs held-out images, on the same model before and after the delta
    task = demo_task("four", epochs=4)
    gen, pairs = torch.Generator().manual_seed(0), []  # the demo's captions: one generator, train then test
    for images, labels in ((task.data.train_images, task.data.train_labels),
                           (task.data.test_images, task.data.test_labels)):
        keep = labels == task.label
        pairs.append(list(zip(images[keep], digits.captions_for(labels[keep], gen))))
    adapter = get_adapter(task.model, tokenizer=digits.tokenize)
    before = clip_membership_inference(adapter, *pairs)
    slug_fast.apply_delta(task.model, tmp_path / "o" / "delta")  # also checks the model trained here is the same
    after = clip_membership_inference(adapter, *pairs)
    assert report["mia"] == pytest.approx({"before": before["loss"].mean, "after": after["loss"].mean,
                                           "distance_before": before["distance"].mean,
                                           "distance_after": after["distance"].mean})


def test_demo_forgets_several_digits_and_writes_a_revertible_stack(tmp_path):
    out = run("demo", "--forget", "seven,three", "--out", str(tmp_path / "o"), "--quiet", module=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report == json.loads((tmp_path / "o" / "report.json").read_text())
    written = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert {"delta", "interference.png", "report.json", "report.md"} <= set(written)
    plots = [n for n in written if n.startswith("pareto_")]
    assert plots and all(re.fullmatch(r"pareto_(seven|three)_(vision|text)\.png", n) for n in plots)
    assert (tmp_path / "o" / "interference.png").read_bytes()[:4] == b"\x89PNG"
    assert report["unlearn"]["order"] == ["seven", "three"]
    assert report["forget"]["seven_top1_after"] == report["forget"]["three_top1_after"] == 0.0
    assert report["forget"]["seven_top1_before"] > 50 and report["forget"]["three_top1_before"] > 50
    assert report["unlearn"]["interference"]["satisfied"][-1] == [True, True]
    assert "## Interference" in (tmp_path / "o" / "report.md").read_text()
    _, config = slug_fast.load_delta(tmp_path / "o" / "delta")
    assert config["revertible"] and [c["name"] for c in config["concepts"]] == ["seven", "three"]
    assert (tmp_path / "o" / "delta" / "original.safetensors").is_file()


def test_backends_reports_json():
    out = run("backends", module=True)
    info = json.loads(out.stdout)
    assert out.returncode == 0 and set(info) == {"cpp", "triton", "torch"} and info["torch"]["available"]


@pytest.mark.parametrize("args, message", [
    (["demo", "--forget", "eleven"], "unknown digit 'eleven'; choose one of zero, one"),
    (["demo", "--epochs", "0"], "expected a positive integer, got 0"),
    (["demo", "--strategy", "fastest"], "invalid choice: 'fastest'"),
    (["demo", "--forget", "seven,eleven"], "unknown digit 'eleven'"),
    (["demo", "--forget", "seven,7"], "a digit is named twice in 'seven,7'"),
    (["unlearn-everything"], "invalid choice"),
    ([], "the following arguments are required: command"),
])
def test_bad_input_exits_2_with_one_line_and_touches_nothing(tmp_path, args, message):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "report.json").write_text("keep me")
    out = run(*args, "--out", str(out_dir)) if args[:1] == ["demo"] else run(*args, module=True)
    assert out.returncode == 2
    assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1 and message in out.stderr
    assert [p.name for p in out_dir.iterdir()] == ["report.json"]
    assert (out_dir / "report.json").read_text() == "keep me"


def test_out_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me")
    out = run("demo", "--out", str(target), "--epochs", "1", module=True)
    assert out.returncode == 2 and "exists and is not a directory" in out.stderr
    assert target.read_text() == "keep me"


def test_compare_writes_rows_for_each_method(tmp_path):
    out = run("compare", "--forget", "2", "--methods", "slug,ga", "--out", str(tmp_path / "c"), "--quiet",
              module=True)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert rows == json.loads((tmp_path / "c" / "compare.json").read_text())
    assert [r["method"] for r in rows] == ["slug", "ga"]
    keys = {"method", "setting", "seconds", "grid_seconds", "peak_rss_mb", "forget_top1", "retain_top1", "mia"}
    for r in rows:
        assert keys <= set(r) and r["reached"] and r["forget_top1"] == 0.0
        assert 0 < r["seconds"] <= r["grid_seconds"] and r["peak_rss_mb"] > 50
    md = (tmp_path / "c" / "compare.md").read_text()
    assert "## ga: every setting tried" in md and md.count("| lr=") >= 5  # GA's whole grid is listed
    assert (tmp_path / "c" / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_refuses_an_unknown_method(tmp_path):
    out = run("compare", "--methods", "slug,magic", "--out", str(tmp_path / "c"), module=True)
    assert out.returncode == 2 and "unknown method 'magic'" in out.stderr and not (tmp_path / "c").exists()


def _default_sigint():
    """In the child: Ctrl-C's default handling, also when this test runs as a background job
    (whose SIGINT is ignored, and Python then installs no KeyboardInterrupt handler)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_is_one_line_exit_130_and_leaves_out_untouched(tmp_path):
    import signal
    import time

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "report.json").write_text("keep me")
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "slug_fast", "demo", "--epochs", "30", "--out", str(out_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_default_sigint)
    # wait until it has spent CPU time well past the imports (about 2.5 s): it is training
    ticks = os.sysconf("SC_CLK_TCK")
    for _ in range(600):
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        if (int(fields[11]) + int(fields[12])) / ticks > 8:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.strip() == "slug-fast: interrupted (outputs are written whole or not at all)" and stdout == ""
    assert [p.name for p in out_dir.iterdir()] == ["report.json"] and (out_dir / "report.json").read_text() == "keep me"


def test_ctrl_c_while_the_imports_run_is_one_line_exit_130(tmp_path):
    import signal

    env = {**os.environ, "TQDM_DISABLE": "1"}
    # -X importtime reports each module as it finishes: a torch submodule done means `import
    # slug_fast` (which imports torch first) is under way, and much of torch is still to come
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "slug_fast", "demo", "--out", str(tmp_path / "o")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_default_sigint)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if re.search(r"\|\s+torch\.", line):
            break
    assert lines and re.search(r"\|\s+torch\.", lines[-1]), "no torch import seen"
    proc.send_signal(signal.SIGINT)
    stdout, rest = proc.communicate(timeout=120)
    said = [ln for ln in (lines + rest.splitlines(keepends=True)) if not ln.startswith("import time:")]
    assert proc.returncode == 130, "".join(said)
    assert [ln.strip() for ln in said] == ["slug-fast: interrupted (outputs are written whole or not at all)"] and stdout == ""
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("orig_argv, exits", [
    (["python", "-m", "slug_fast", "demo"], True),
    (["python", "-X", "importtime", "-I", "-m", "slug_fast.cli", "unlearn"], True),
    (["/venv/bin/python", "/venv/bin/slug-fast", "demo"], True),
    (["python", "-m", "pytest", "tests"], False),
    (["python", "my_script.py", "slug-fast"], False),
    (["python", "-c", "import slug_fast"], False),
])
def test_only_the_command_line_exits_when_interrupted_while_starting(monkeypatch, capsys, orig_argv, exits):
    from slug_fast import cli

    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    if exits:
        with pytest.raises(SystemExit) as stop:
            cli.exit_if_interrupted_while_starting()
        assert stop.value.code == 130 and capsys.readouterr().err == "slug-fast: interrupted (outputs are written whole or not at all)\n"
    else:
        cli.exit_if_interrupted_while_starting()  # a program importing slug_fast keeps its KeyboardInterrupt
        assert capsys.readouterr().err == ""
