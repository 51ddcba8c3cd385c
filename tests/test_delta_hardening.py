"""Deltas, reports and saved models are written all or nothing, and read back checked."""
import copy
import json
import linecache
import os
import random
import re
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import slug_fast
from slug_fast import delta as delta_mod
from slug_fast import files, loading, report
from slug_fast.delta import CONFIG_FILE, ORIGINALS_FILE, TENSORS_FILE, load_delta, save_delta, tensor_spec
from slug_fast.errors import DeltaError, NonFiniteError, SlugError

EDITED = ("0.weight", "1.bias")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def make_delta(model, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    named = dict(model.named_parameters())
    delta = {n: scale * torch.randn(named[n].shape, generator=g) for n in EDITED}
    return delta, {n: tensor_spec(named[n]) for n in EDITED}


def snapshot(folder):
    """Every non-hidden file under `folder` (relative path -> bytes)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def hidden(folder):
    return [p.name for p in Path(folder).iterdir() if p.name.startswith(".")]


def fail_nth_move_into(monkeypatch, folder, n):
    """Make the n-th rename/replace whose destination lies directly in `folder` fail (ENOSPC);
    the OS's atomic exchange is turned off so every move goes through os.rename/os.replace."""
    monkeypatch.setattr(files, "_RENAMEAT2", None, raising=False)
    folder, count = Path(folder).resolve(), [0]

    def wrap(real):
        def move(src, dst, *args, **kw):
            if Path(dst).resolve().parent == folder:
                count[0] += 1
                if count[0] == n:
                    raise OSError(28, "No space left on device", str(dst))
            return real(src, dst, *args, **kw)
        return move

    monkeypatch.setattr(os, "rename", wrap(os.rename))
    monkeypatch.setattr(os, "replace", wrap(os.replace))
    return count


@pytest.fixture(params=["atomic-exchange", "two-renames"])
def exchange_mode(request, monkeypatch):
    if request.param == "two-renames":
        monkeypatch.setattr(files, "_RENAMEAT2", None)
    elif files._RENAMEAT2 is None:
        pytest.skip("renameat2 not available here")
    return request.param


# 1. a delta is a pair, written and read as one

def test_interrupted_delta_save_keeps_the_old_pair(tmp_path, monkeypatch):
    model = tiny_model()
    old, specs = make_delta(model, seed=1)
    new, _ = make_delta(model, seed=2)
    save_delta(tmp_path / "d", old, specs, {"step": 1.0})

    def no_space(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(delta_mod, "write_json_atomic", no_space)
    with pytest.raises(Exception) as err:
        save_delta(tmp_path / "d", new, specs, {"step": 2.0})
    tensors, config = load_delta(tmp_path / "d")
    assert config["step"] == 1.0 and all(torch.equal(tensors[n], old[n]) for n in EDITED)
    assert isinstance(err.value, DeltaError) and str(tmp_path / "d") in str(err.value)
    assert "No space left on device" in str(err.value)
    assert hidden(tmp_path) == [] and sorted(os.listdir(tmp_path / "d")) == [TENSORS_FILE, CONFIG_FILE]


def test_a_mixed_pair_is_refused_and_an_old_format_delta_still_loads(tmp_path):
    model = tiny_model()
    a, specs = make_delta(model, seed=1)
    b, _ = make_delta(model, seed=2)
    save_delta(tmp_path / "a", a, specs, {"step": 1.0})
    save_delta(tmp_path / "b", b, specs, {"step": 2.0})
    (tmp_path / "a" / TENSORS_FILE).write_bytes((tmp_path / "b" / TENSORS_FILE).read_bytes())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(DeltaError, match="SHA-256 differs"):
        slug_fast.apply_delta(model, tmp_path / "a")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # written before the hash was recorded: still read
    cfg = json.loads((tmp_path / "b" / CONFIG_FILE).read_text())
    assert len(cfg.pop("tensors_file_sha256")) == 64
    (tmp_path / "b" / CONFIG_FILE).write_text(json.dumps(cfg))
    assert slug_fast.apply_delta(model, tmp_path / "b") == list(EDITED)


def saved_beside_a_user_file(tmp_path):
    """(folder holding a user's notes.txt and a saved delta, another delta, specs, the folder's snapshot)."""
    model = tiny_model()
    old, specs = make_delta(model, seed=1)
    new, _ = make_delta(model, seed=2)
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    save_delta(d, old, specs, {"step": 1.0})
    return d, new, specs, snapshot(d)


def test_delta_saved_into_a_folder_with_other_files_swaps_only_the_pair(tmp_path, monkeypatch, exchange_mode):
    d, new, specs, kept = saved_beside_a_user_file(tmp_path)
    calls = [0]
    real = files.exchange

    def second_fails(a, b):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(5, "Input/output error")
        real(a, b)

    monkeypatch.setattr(files, "exchange", second_fails)
    with pytest.raises(DeltaError, match="Input/output error"):
        save_delta(d, new, specs, {"step": 2.0})
    assert snapshot(d) == kept and hidden(d) == [] and hidden(tmp_path) == []
    monkeypatch.setattr(files, "exchange", real)
    save_delta(d, new, specs, {"step": 2.0})
    assert (d / "notes.txt").read_text() == "mine" and load_delta(d)[1]["step"] == 2.0
    assert sorted(os.listdir(d)) == sorted([TENSORS_FILE, CONFIG_FILE, "notes.txt"])


def test_a_failed_move_in_the_pair_swap_restores_the_old_pair(tmp_path, monkeypatch):
    d, new, specs, kept = saved_beside_a_user_file(tmp_path)
    fail_nth_move_into(monkeypatch, d, 2)
    with pytest.raises(SlugError):
        save_delta(d, new, specs, {"step": 2.0})
    assert snapshot(d) == kept and load_delta(d)[1]["step"] == 1.0


def test_exchange_swaps_files_folders_and_absences(tmp_path, exchange_mode):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "x").write_text("in a")
    b.write_text("b")
    files.exchange(a, b)
    assert a.read_text() == "b" and (b / "x").read_text() == "in a"
    a.unlink()
    files.exchange(a, b)
    assert not b.exists() and (a / "x").read_text() == "in a"
    files.exchange(tmp_path / "none", tmp_path / "nothing")
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_new_delta_folder_gets_the_usual_permissions(tmp_path):
    model = tiny_model()
    d, specs = make_delta(model)
    mask = os.umask(0o022)
    try:
        path = save_delta(tmp_path / "new" / "d", d, specs)
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o755 and (path / CONFIG_FILE).stat().st_mode & 0o777 == 0o644


# 2. report outputs are swapped in as a set

def fake_result(model, seed, towers=("text", "vision")):
    delta, specs = make_delta(model, seed=seed)
    return SimpleNamespace(save=lambda path, revertible=False: save_delta(
                               path, delta, specs, {"step": float(seed)},
                               {n: dict(model.named_parameters())[n].detach() for n in delta} if revertible else None),
                           fronts={t: [] for t in towers}, stats=SimpleNamespace(names=[]),
                           tower_members={}, layers=list(EDITED))


def fake_plot(fail_at=None):
    calls = [0]

    def plot(stats, members, front, chosen, path, title):
        calls[0] += 1
        if calls[0] == fail_at:
            raise OSError(28, "No space left on device")
        files.write_atomic(path, lambda tmp: Path(tmp).write_bytes(b"\x89PNG" + title.encode()))
        return Path(path)
    return plot


def fake_similarity(run):
    return lambda path: Path(path).write_bytes(b"\x89PNG similarity %d" % run)


def test_write_outputs_failing_midway_leaves_the_old_set(tmp_path, monkeypatch):
    out, model = tmp_path / "out", tiny_model()
    out.mkdir()
    (out / "mine.txt").write_text("user file")
    monkeypatch.setattr(report, "plot_pareto", fake_plot())
    first = report.write_outputs(out, {"concept": "one", "layer": [], "step": 1.0, "seconds": {}},
                                 fake_result(model, 1), {"similarity": ("similarity.png", fake_similarity(1))})
    kept = snapshot(out)
    assert set(kept) >= {"report.json", "report.md", "pareto_text.png", "pareto_vision.png", "mine.txt",
                         "similarity.png", f"delta/{TENSORS_FILE}", f"delta/{ORIGINALS_FILE}", f"delta/{CONFIG_FILE}"}
    assert first["similarity"] == str(out / "similarity.png")
    assert json.loads((out / "report.json").read_text())["files"] == first
    monkeypatch.setattr(report, "plot_pareto", fake_plot(fail_at=2))
    with pytest.raises(OSError):
        report.write_outputs(out, {"concept": "two", "layer": [], "step": 2.0, "seconds": {}}, fake_result(model, 2))
    assert snapshot(out) == kept and hidden(out) == []
    assert load_delta(out / "delta")[1]["step"] == 1.0


@pytest.mark.parametrize("n", [1, 2, 4, 5])
def test_write_outputs_failing_in_the_swap_restores_the_old_set(tmp_path, monkeypatch, n):
    out, model = tmp_path / "out", tiny_model()
    out.mkdir()
    (out / "mine.txt").write_text("user file")
    monkeypatch.setattr(report, "plot_pareto", fake_plot())
    report.write_outputs(out, {"concept": "one", "layer": [], "step": 1.0, "seconds": {}}, fake_result(model, 1))
    kept = snapshot(out)
    fail_nth_move_into(monkeypatch, out, n)
    with pytest.raises(OSError):
        report.write_outputs(out, {"concept": "two", "layer": [], "step": 2.0, "seconds": {}}, fake_result(model, 2))
    assert snapshot(out) == kept and hidden(out) == []


def test_write_outputs_replaces_its_own_stale_outputs_only(tmp_path, monkeypatch, exchange_mode):
    out, model = tmp_path / "out", tiny_model()
    monkeypatch.setattr(report, "plot_pareto", fake_plot())
    report.write_outputs(out, {"concept": "one", "layer": [], "step": 1.0, "seconds": {}}, fake_result(model, 1))
    (out / "pareto_mine.png").write_bytes(b"user plot")  # not listed by the report: not ours
    (out / "delta" / "readme.txt").write_text("user note inside delta/")
    files_ = report.write_outputs(out, {"concept": "two", "layer": [], "step": 2.0, "seconds": {}},
                                  fake_result(model, 2, towers=("vision",)))
    assert sorted(os.listdir(out)) == ["delta", "pareto_mine.png", "pareto_vision.png", "report.json", "report.md"]
    assert (out / "delta" / "readme.txt").read_text() == "user note inside delta/"
    assert load_delta(out / "delta")[1]["step"] == 2.0 and "two" in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["files"] == files_


def watch_states(monkeypatch, folder):
    """Record what `folder` holds (snapshot, or None when absent) after every rename."""
    states = []

    def look():
        states.append(snapshot(folder) if Path(folder).is_dir() else None)

    def wrap(real):
        def move(*args, **kw):
            result = real(*args, **kw)
            look()
            return result
        return move

    monkeypatch.setattr(os, "rename", wrap(os.rename))
    monkeypatch.setattr(os, "replace", wrap(os.replace))
    if files._RENAMEAT2 is not None:
        monkeypatch.setattr(files, "_RENAMEAT2", wrap(files._RENAMEAT2))
    return states


def test_write_outputs_over_an_earlier_run_swaps_the_whole_set_at_once(tmp_path, monkeypatch, exchange_mode):
    out, model = tmp_path / "out", tiny_model()
    monkeypatch.setattr(report, "plot_pareto", fake_plot())
    report.write_outputs(out, {"concept": "one", "layer": [], "step": 1.0, "seconds": {}}, fake_result(model, 1),
                         {"similarity": ("similarity.png", fake_similarity(1))})
    os.chmod(out, 0o750)
    old = snapshot(out)
    states = watch_states(monkeypatch, out)
    files_ = report.write_outputs(out, {"concept": "two", "layer": [], "step": 2.0, "seconds": {}},
                                  fake_result(model, 2, towers=("vision",)))
    new = snapshot(out)
    assert sorted(new) == sorted([f"delta/{CONFIG_FILE}", f"delta/{TENSORS_FILE}", f"delta/{ORIGINALS_FILE}", "pareto_vision.png", "report.json",
                                  "report.md"])  # the earlier run's pareto_text.png and similarity.png went with it
    assert json.loads(new["report.json"])["files"] == files_ and load_delta(out / "delta")[1]["step"] == 2.0
    # a reader looking at any moment sees the old set, the new set or (two renames) nothing
    allowed = [old, new] + ([None] if exchange_mode == "two-renames" else [])
    assert all(state in allowed for state in states) and new in states
    assert out.stat().st_mode & 0o777 == 0o750 and hidden(out) == [] and hidden(tmp_path) == []


def test_a_file_created_during_a_whole_set_swap_is_kept(tmp_path, monkeypatch):
    out, model = tmp_path / "out", tiny_model()
    monkeypatch.setattr(report, "plot_pareto", fake_plot())
    report.write_outputs(out, {"concept": "one", "layer": [], "step": 1.0, "seconds": {}}, fake_result(model, 1))
    real = files.exchange

    def another_program_writes_first(a, b):
        if Path(b) == out:
            (out / "theirs.txt").write_text("written while we swapped")
        real(a, b)

    monkeypatch.setattr(files, "exchange", another_program_writes_first)
    report.write_outputs(out, {"concept": "two", "layer": [], "step": 2.0, "seconds": {}}, fake_result(model, 2))
    assert (out / "theirs.txt").read_text() == "written while we swapped"
    assert load_delta(out / "delta")[1]["step"] == 2.0 and hidden(tmp_path) == []


def test_write_outputs_under_a_read_only_parent_stages_inside(tmp_path, monkeypatch):
    out, model = tmp_path / "out", tiny_model()
    monkeypatch.setattr(report, "plot_pareto", fake_plot())
    report.write_outputs(out, {"concept": "one", "layer": [], "step": 1.0, "seconds": {}}, fake_result(model, 1))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != tmp_path and real_access(p, mode, **kw))
    made = []
    real_mkdtemp = files.tempfile.mkdtemp
    monkeypatch.setattr(files.tempfile, "mkdtemp", lambda **kw: made.append(kw["dir"]) or real_mkdtemp(**kw))
    report.write_outputs(out, {"concept": "two", "layer": [], "step": 2.0, "seconds": {}}, fake_result(model, 2))
    assert made and all(Path(d) != tmp_path for d in made)  # nothing created in the read-only parent
    assert load_delta(out / "delta")[1]["step"] == 2.0 and hidden(out) == [] and hidden(tmp_path) == []


@pytest.mark.parametrize("foreign", [False, True])
def test_replace_dir_swaps_at_once_only_a_folder_of_its_own_files(tmp_path, monkeypatch, exchange_mode, foreign):
    out = tmp_path / "out"

    def write_run(run):
        def write(staging):
            for name in ("a.png", "b.md", "c.json"):
                (staging / name).write_text(f"{name} of run {run}")
            return ["a.png", "b.md", "c.json"]
        return write

    files.replace_dir(out, write_run(1))
    if foreign:
        (out / "theirs.txt").write_text("not ours")
    old = snapshot(out)
    states = watch_states(monkeypatch, out)
    files.replace_dir(out, write_run(2))
    new = snapshot(out)
    assert new == {**({"theirs.txt": b"not ours"} if foreign else {}),
                   **{n: f"{n} of run 2".encode() for n in ("a.png", "b.md", "c.json")}}
    mixed = [s for s in states if s not in (old, new, None)]
    # beside a file of another program the names are swapped one by one: a reader can see a mix
    assert bool(mixed) == foreign and (None not in states or exchange_mode == "two-renames")
    assert hidden(out) == [] and hidden(tmp_path) == []


# 3. saving an edited model is all or nothing

def fake_adapter(src, seed):
    return SimpleNamespace(name="open_clip", model=tiny_model(seed),
                           source={"library": "open_clip", "name": f"local-dir:{src}"})


def saved_then_config_changed(tmp_path):
    """(src, out): a model saved to out from src, then src's config changed for the next save."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 1}}))
    loading.save_model(fake_adapter(src, 0), out)
    (src / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 2}}))
    return src, out


@pytest.mark.parametrize("n", [1, 2])
def test_save_model_failing_midway_keeps_the_old_folder(tmp_path, monkeypatch, n):
    src, out = saved_then_config_changed(tmp_path)
    (out / "mine.txt").write_text("user file")
    kept = snapshot(out)
    fail_nth_move_into(monkeypatch, out, n)
    with pytest.raises(OSError):
        loading.save_model(fake_adapter(src, 1), out)
    assert snapshot(out) == kept and hidden(out) == [] and hidden(tmp_path) == []
    state = load_file(out / "open_clip_model.safetensors")
    assert all(torch.equal(v, state[k]) for k, v in tiny_model(0).state_dict().items())
    assert json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["embed_dim"] == 1
    monkeypatch.undo()
    loading.save_model(fake_adapter(src, 1), out)
    assert json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["embed_dim"] == 2
    assert (out / "mine.txt").read_text() == "user file"


def test_save_model_over_its_own_earlier_save_swaps_the_folder_at_once(tmp_path, monkeypatch, exchange_mode):
    src, out = saved_then_config_changed(tmp_path)
    old = snapshot(out)
    states = watch_states(monkeypatch, out)
    loading.save_model(fake_adapter(src, 1), out)
    new = snapshot(out)
    assert sorted(new) == ["open_clip_config.json", "open_clip_model.safetensors"] and new != old
    assert all(state in [old, new, None] if exchange_mode == "two-renames" else state in [old, new]
               for state in states)
    assert hidden(tmp_path) == []


def test_save_model_refuses_a_path_under_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SlugError, match="is a file, not a directory"):
        loading.save_model(fake_adapter(tmp_path, 0), tmp_path / "f" / "sub")


# 4. save_delta checks everything before creating anything

@pytest.mark.parametrize("change, match", [
    (lambda d, s, m: (d, {}, m), "specs have no entry for delta tensor '0.weight'"),
    (lambda d, s, m: ({}, s, m), "non-empty mapping"),
    (lambda d, s, m: ({**d, "": d["1.bias"]}, s, m), "delta names must be non-empty strings; got ''"),
    (lambda d, s, m: ({**d, 3: d["1.bias"]}, s, m), "delta names must be non-empty strings; got 3"),
    (lambda d, s, m: ({**d, "1.bias": torch.tensor([1.0, float("nan")])}, s, m), "'1.bias' holds NaN or Inf"),
    (lambda d, s, m: ({**d, "1.bias": torch.ones(2, dtype=torch.int64)}, s, m),
     "delta for '1.bias' is torch.int64; expected a floating-point tensor"),
    (lambda d, s, m: ({**d, "1.bias": [1.0, 2.0]}, s, m), "delta for '1.bias' is list; expected a floating-point"),
    (lambda d, s, m: ({**d, "1.bias": torch.ones(3)}, s, m), r"has shape \[3\]; its spec says \[2\]"),
    (lambda d, s, m: (d, {**s, "1.bias": "spec"}, m), "spec of '1.bias' is a str"),
    (lambda d, s, m: (d, {**s, "1.bias": {**s["1.bias"], "dtype": "float33"}}, m), "torch dtype name"),
    (lambda d, s, m: (d, s, {"format": "mine"}), r"meta may not set \['format'\]"),
    (lambda d, s, m: (d, s, {"step": object()}), "JSON-serialisable"),
    (lambda d, s, m: (d, s, {"slug_fast_version": "9"}), r"meta may not set \['slug_fast_version'\]"),
    (lambda d, s, m: (d, s, {"layers": "0.weight"}), "meta has layers '0.weight'; expected a list of names"),
    (lambda d, s, m: (d, s, {"max_evals": 0}), "meta has max_evals '0'; expected a positive integer"),
])
def test_save_delta_refuses_bad_input_before_creating_anything(tmp_path, change, match):
    d, s = make_delta(tiny_model())
    with pytest.raises(DeltaError, match=match):
        save_delta(tmp_path / "a" / "b", *change(d, s, {"step": 1.0}))
    assert os.listdir(tmp_path) == []


def test_save_delta_under_a_file_is_a_delta_error(tmp_path):
    (tmp_path / "FILE").write_text("x")
    d, s = make_delta(tiny_model())
    with pytest.raises(DeltaError, match=r"FILE is a file, not a directory"):
        save_delta(tmp_path / "FILE" / "sub" / "d", d, s)
    with pytest.raises(DeltaError, match="^delta directory .*FILE exists and is not a directory"):
        save_delta(tmp_path / "FILE", d, s)
    assert os.listdir(tmp_path) == ["FILE"]


# 5. every config entry is type-checked on load

@pytest.mark.parametrize("edit, match", [
    (lambda c: c["tensors"].update({"0.weight": "x"}), r"tensors\['0.weight'\] is a str"),
    (lambda c: c["tensors"]["0.weight"].update(shape=["4", 3]), r"has shape \['4', 3\]; expected a list of non-neg"),
    (lambda c: c["tensors"]["0.weight"].update(shape=[4, True]), "list of non-negative integers"),
    (lambda c: c["tensors"]["0.weight"].update(dtype=["float32"]), r"has dtype \['float32'\]; expected a torch dtype"),
    (lambda c: c["tensors"]["0.weight"].pop("base_sha256"), "base_sha256 'None'"),
    (lambda c: c["tensors"]["1.bias"].update(base_sha256=7), "has base_sha256 '7'; expected 64 lowercase hex"),
    (lambda c: c["tensors"]["1.bias"].update(base_sha256="X" * 64), "has base_sha256 'XXXX"),
    (lambda c: c["tensors"]["1.bias"].update(base_sha256="a" * 100), "has base_sha256 '" + "a" * 80 + "'; expected"),
    (lambda c: c["tensors"]["1.bias"].update(result_sha256="r"), "has result_sha256 'r'; expected 64 lowercase"),
    (lambda c: c.update(layers="L" * 100), "has layers '" + "L" * 80 + "'; expected a list of names"),
    (lambda c: c.update(version=True), "has version True"),
    (lambda c: c.update(version="1.x"), "has version '1.x'; expected a delta format version such as '1.2'"),
    (lambda c: c.update(version="3.1"), r"version 3.1, a newer major version than this slug_fast \(.+\) reads: 1.x, "
                                        r"up to 1.2; upgrade slug_fast to read it$"),
    (lambda c: c.update(version=0), r"version 0.0, another major version than this slug_fast \(.+\) reads: 1.x, "
                                    r"up to 1.2$"),
    (lambda c: c.update(step="1.5"), "has step '1.5'; expected a number"),
    (lambda c: c.update(layers=["0.weight", 1]), "has layers .*; expected a list of names"),
    (lambda c: c.update(group=1), "has group '1'; expected true or false"),
    (lambda c: c.update(cache="all"), "has cache 'all'; expected true, false or 'linear'"),
    (lambda c: c.update(max_evals=2.0), "has max_evals '2.0'; expected a positive integer"),
    (lambda c: c.update(strategy=["best"]), r"has strategy \"\['best'\]\"; expected a string"),
    (lambda c: c.update(slug_fast_version=1), "has slug_fast_version '1'; expected a string"),
    (lambda c: c.update(tensors=[]), "'tensors' table"),
    (lambda c: c.update(tensors={}), "delta_config.json lists no tensors$"),
    (lambda c: c.update(tensors_file_sha256=None), "tensors_file_sha256 'None'"),
    (lambda c: c.update(originals_file_sha256="ABC"), "has originals_file_sha256 'ABC'; expected 64 lowercase hex"),
    (lambda c: c.update(tensors_file_sha256="f" * 200), "has tensors_file_sha256 '" + "f" * 80 + "'; expected"),
    (lambda c: c.update(revertible=True), "is marked revertible but records no originals_file_sha256$"),
    (lambda c: c.update(format="slug_fast.other"), "is not a slug_fast.delta config"),
    (lambda c: c["tensors"].pop("1.bias"), "do not match the config"),
])
def test_load_delta_checks_every_config_entry(tmp_path, edit, match):
    model = tiny_model()
    path = save_delta(tmp_path / "d", *make_delta(model))
    cfg = json.loads((path / CONFIG_FILE).read_text())
    edit(cfg)
    (path / CONFIG_FILE).write_text(json.dumps(cfg))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(DeltaError, match=match):
        slug_fast.apply_delta(model, path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())



def test_recorded_fields_are_declared_with_their_kinds_at_import(tmp_path):
    """DeltaConfig's checks and to_dict read each recorded field's declared kind, fixed when the module
    is imported: a fresh import of slug_fast.delta writes every recorded entry and refuses each of the
    wrong type (the checks above run against the import the test session made)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("slug_fast.delta", delta_mod.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    model = tiny_model()
    path = save_delta(tmp_path / "d", *make_delta(model))
    cfg = json.loads((path / CONFIG_FILE).read_text())
    recorded = {"method": "slug", "layers": ["0.weight"], "step": 0.5, "group": False, "cache": "linear",
                "max_evals": 3, "concepts": [{"name": "cat"}], "revertible": False}
    cfg.update(recorded)
    config = fresh.DeltaConfig.from_dict(cfg)
    assert config.to_dict() == cfg and config.extra == {}
    assert fresh.DeltaConfig(tensors=cfg["tensors"]).to_dict().keys() == {"format", "version", "tensors"}
    for key, bad in (("step", "1.5"), ("layers", "0.weight"), ("group", 1), ("cache", "all"), ("max_evals", 0),
                     ("concepts", ["cat"]), ("method", 7)):
        with pytest.raises(DeltaError, match=f"has {key} .*; expected"):
            fresh.DeltaConfig.from_dict({**cfg, key: bad})


# 6. fuzz: a mutated delta applies exactly or is refused with the model untouched

OTHER_VALUES = [None, True, False, 0, -1, 1.5, 10 ** 30, "", "x", "float32", [], {}, [1, 2], {"a": 1}, "0" * 64]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _mutate_config(rng, cfg: dict) -> bytes:
    kind = rng.randrange(6)
    text = json.dumps(cfg).encode()
    if kind == 0:  # truncation
        return text[:rng.randrange(len(text))]
    if kind == 1:  # garbage bytes
        b = bytearray(text)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    cfg = copy.deepcopy(cfg)
    path = rng.choice([p for p in _paths(cfg) if p])
    parent = cfg
    for key in path[:-1]:
        parent = parent[key]
    key, value = path[-1], parent[path[-1]]
    if kind == 2:  # drop a key or list item
        del parent[key]
    elif kind == 3:  # swap the type
        parent[key] = rng.choice([v for v in OTHER_VALUES if type(v) is not type(value)])
    elif kind == 4:  # change the value, keeping the type
        if isinstance(value, bool):
            parent[key] = not value
        elif isinstance(value, (int, float)):
            parent[key] = value + rng.choice([-1, 1, 0.5, -value - 1])
        elif isinstance(value, str):
            parent[key] = value[:-1] + rng.choice("0af.x") if value else "x"
        else:
            parent[key] = type(value)()
    else:  # rename a key
        if isinstance(parent, dict):
            parent[str(key) + rng.choice(["x", ".", " "])] = parent.pop(key)
        else:
            parent.append(copy.deepcopy(value))
    return json.dumps(cfg).encode()


def _mutate_tensors(rng, data: bytes) -> bytes:
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    kind = rng.randrange(4)
    b = bytearray(data)
    if kind == 0:  # bytes of the header (its length prefix included)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(header_end)] = rng.randrange(256)
    elif kind == 1:  # one character of the header JSON replaced by a plausible one
        b[rng.randrange(8, header_end)] = ord(rng.choice('0123456789[]{}",:FIUB '))
    elif kind == 2:
        return bytes(b[:rng.randrange(len(b))])
    else:
        return bytes(b) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(b)


def test_fuzzed_deltas_apply_exactly_or_are_refused(tmp_path):
    rng = random.Random(20240716)
    base = tiny_model()
    state = copy.deepcopy(base.state_dict())
    meta = {"method": "slug", "layers": list(EDITED), "step": 1.5, "strategy": "best", "group": False,
            "max_evals": 10, "cache": "linear", "memory_mode": "full"}  # the run's settings, as UnlearnResult.save
    good = save_delta(tmp_path / "good", *make_delta(base), meta)
    data, cfg = (good / TENSORS_FILE).read_bytes(), json.loads((good / CONFIG_FILE).read_text())
    expected = tiny_model()
    slug_fast.apply_delta(expected, good)
    expected = {k: v.numpy().tobytes() for k, v in expected.state_dict().items()}
    unedited = {k: v.numpy().tobytes() for k, v in state.items()}
    model, case = tiny_model(), tmp_path / "case"
    case.mkdir()
    outcomes = {"applied": 0, "refused": 0}
    for i in range(600):
        c = copy.deepcopy(cfg)
        if i % 3 == 2:
            c.pop("tensors_file_sha256")  # an old-format delta: the parser alone guards the tensor file
        mutate = rng.randrange(3)  # config, tensor file, both
        (case / CONFIG_FILE).write_bytes(_mutate_config(rng, c) if mutate != 1 else json.dumps(c).encode())
        (case / TENSORS_FILE).write_bytes(_mutate_tensors(rng, data) if mutate != 0 else data)
        model.load_state_dict(state)
        try:
            slug_fast.apply_delta(model, case)
            now, outcome = expected, "applied"
        except SlugError:
            now, outcome = unedited, "refused"
        except Exception as err:  # noqa: BLE001 -- the point of the test
            pytest.fail(f"case {i}: {type(err).__name__}: {err}")
        got = {k: v.numpy().tobytes() for k, v in model.state_dict().items()}
        assert got == now, f"case {i} {outcome} but the model is not what it should be"
        outcomes[outcome] += 1
    assert outcomes["applied"] > 20 and outcomes["refused"] > 300, outcomes


def test_a_delta_that_overflows_the_dtype_is_refused_and_the_model_kept(tmp_path):
    model = tiny_model().half()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta, specs = make_delta(model, scale=1e5)  # float16 tops out at 65504
    save_delta(tmp_path / "d", delta, specs, {"step": 1.0})
    with pytest.raises(NonFiniteError, match="out of the range of torch.float16"):
        slug_fast.apply_delta(model, tmp_path / "d")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_output_directories_that_cannot_be_written_are_refused_first(tmp_path, monkeypatch):
    """Read-only targets (simulated: the tests may run as root, who can write anywhere)."""
    from slug_fast.files import check_dir_target

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path / "ro")
    with pytest.raises(SlugError, match="--out .*ro is not writable"):
        check_dir_target(tmp_path / "ro", "--out", writable=True)
    with pytest.raises(SlugError, match="cannot be created: .*ro is not writable"):
        check_dir_target(tmp_path / "ro" / "new", "--out", writable=True)
    assert check_dir_target(tmp_path / "fine" / "new", "--out", writable=True) == tmp_path / "fine" / "new"


def test_save_delta_checks_each_original_against_its_spec(tmp_path):
    model = tiny_model()
    delta, specs = make_delta(model)
    named = dict(model.named_parameters())
    originals = {n: named[n].detach().clone() for n in EDITED}
    w = originals["0.weight"]
    bad = [
        ([w], r"originals must map every delta name, and only those, to its original tensor; got list"),
        ({"0.weight": w}, r"originals must map every delta name, .*; got \['0.weight'\]"),
        ({**originals, "2.weight": w}, r"originals must map every delta name, .*; got \['0.weight', '1.bias', "),
        ({**originals, "0.weight": w.double()}, r"original of '0.weight' is \[4, 3\] torch.float64; its spec says "
                                                r"\[4, 3\] float32"),
        ({**originals, "0.weight": w.t()}, r"original of '0.weight' is \[3, 4\] torch.float32; its spec says "
                                           r"\[4, 3\] float32"),
        ({**originals, "0.weight": w.tolist()}, r"original of '0.weight' is list; its spec says \[4, 3\] float32"),
        ({**originals, "0.weight": w + 1}, r"original of '0.weight' is not the tensor its spec describes"),
    ]
    for given, match in bad:
        with pytest.raises(DeltaError, match=match):
            save_delta(tmp_path / "bad", delta, specs, {"step": 1.0}, given)
        assert not (tmp_path / "bad").exists()
    path = save_delta(tmp_path / "ok", delta, specs, {"step": 1.0}, originals)
    assert (path / ORIGINALS_FILE).is_file()


def test_a_revert_failing_midway_puts_back_what_it_had_restored(tmp_path, monkeypatch):
    model = tiny_model()
    delta, _ = make_delta(model)
    named = dict(model.named_parameters())
    specs = {n: tensor_spec(named[n], delta[n]) for n in EDITED}  # with the result's SHA-256, for revert
    path = save_delta(tmp_path / "d", delta, specs, {"step": 1.0}, {n: named[n].detach().clone() for n in EDITED})
    slug_fast.apply_delta(model, path)
    applied = {n: p.detach().clone() for n, p in model.named_parameters()}
    real_copy, calls = torch.Tensor.copy_, []

    def copy_failing_second(self, src, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second tensor's copy fails (out of memory on a device, say)
            raise RuntimeError("copy failed")
        return real_copy(self, src, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "copy_", copy_failing_second)
    with pytest.raises(RuntimeError, match="copy failed"):
        slug_fast.revert_delta(model, path)
    monkeypatch.undo()
    assert all(torch.equal(p.detach(), applied[n]) for n, p in model.named_parameters())  # the first put back
    assert len(calls) > 2  # the rollback copied back
    assert sorted(slug_fast.revert_delta(model, path)) == sorted(EDITED)  # and a revert still works
    slug_fast.apply_delta(model, path)
    (path / ORIGINALS_FILE).unlink()  # a revertible config whose originals file is gone
    with pytest.raises(DeltaError, match="saved without its original tensors, so it cannot be reverted"):
        slug_fast.revert_delta(model, path)
    assert all(torch.equal(p.detach(), applied[n]) for n, p in model.named_parameters())


def test_apply_delta_refuses_a_parameter_of_another_shape_untouched(tmp_path):
    model = tiny_model()
    delta, specs = make_delta(model)
    path = save_delta(tmp_path / "d", delta, specs, {"step": 1.0})
    other = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(DeltaError, match=r"delta for '0.weight' has shape \[4, 3\]; the model's parameter has "
                                         r"shape \[5, 3\]"):
        slug_fast.apply_delta(other, path, verify_base=False)
    assert all(torch.equal(p.detach(), before[n]) for n, p in other.named_parameters())


def test_load_delta_names_the_file_at_fault(tmp_path):
    model = tiny_model()
    delta, specs = make_delta(model)
    path = save_delta(tmp_path / "d", delta, specs, {"step": 1.0})
    config = json.loads((path / CONFIG_FILE).read_text())
    (path / CONFIG_FILE).write_text(json.dumps({**config, "format": "something else"}))
    with pytest.raises(DeltaError, match="^" + re.escape(str(path / CONFIG_FILE))):
        load_delta(path)
    for missing in (TENSORS_FILE, CONFIG_FILE):  # either file alone is not a delta
        path = save_delta(tmp_path / missing, delta, specs, {"step": 1.0})
        (path / missing).unlink()
        with pytest.raises(DeltaError, match=f"is not a slug_fast delta: expected {TENSORS_FILE} and {CONFIG_FILE}"):
            load_delta(path)


def test_delta_config_of_any_json_and_a_newer_minor_version(tmp_path):
    from slug_fast.delta import DeltaConfig

    for not_a_config in ([1, 2], "slug_fast.delta", None):
        with pytest.raises(DeltaError, match="^the delta config is not a slug_fast.delta config"):
            DeltaConfig.from_dict(not_a_config)
    path = save_delta(tmp_path / "d", *make_delta(tiny_model()))
    cfg = json.loads((path / CONFIG_FILE).read_text())
    mine = DeltaConfig.from_dict({**cfg, "extra": "a caller's key named extra", "note": 1})
    assert mine.extra == {"extra": "a caller's key named extra", "note": 1}  # kept, not taken for the field
    with pytest.warns(UserWarning, match="newer than the 1.2 this slug_fast") as caught:
        newer = DeltaConfig.from_dict({**cfg, "version": "1.9", "future": True})
    # the warning points at the caller: this file or, when mutmut runs a mutated copy of the
    # package (in its mutants/ folder), the trampoline every call of from_dict goes through
    mutated = Path(delta_mod.__file__).parent.parent.name == "mutants"
    caller = sys.modules["mutmut.mutation.trampoline"].__file__ if mutated else __file__
    assert caught[0].filename == caller
    # and at the calling line: the call above, or the trampoline's call of the (mutated) method
    called = linecache.getline(caught[0].filename, caught[0].lineno)
    assert ("_func(*call_args" if mutated else "DeltaConfig.from_dict({**cfg, \"version\": \"1.9\"") in called
    assert newer.version == "1.9" and newer.extra == {"future": True}


def test_a_parameter_with_a_zero_size_dimension_round_trips(tmp_path):
    """An empty embedding table is a legal parameter: shape entries may be 0."""
    empty = torch.nn.Parameter(torch.zeros(0, 3))
    spec = tensor_spec(empty)
    path = save_delta(tmp_path / "d", {"empty": torch.zeros(0, 3)}, {"empty": spec}, {"step": 1.0})
    tensors, config = load_delta(path)
    assert config["tensors"]["empty"]["shape"] == [0, 3] and tensors["empty"].shape == (0, 3)


def test_both_tensor_files_say_what_they_are(tmp_path):
    """Each safetensors file's own metadata names the format, for tools that read it alone."""
    from safetensors import safe_open

    model = tiny_model()
    delta, specs = make_delta(model)
    named = dict(model.named_parameters())
    path = save_delta(tmp_path / "d", delta, specs, {"step": 1.0}, {n: named[n].detach().clone() for n in EDITED})
    for name in (TENSORS_FILE, ORIGINALS_FILE):
        with safe_open(str(path / name), "pt") as f:
            assert f.metadata() == {"format": "slug_fast.delta"}


def test_a_plain_delta_saved_over_a_revertible_one_takes_its_originals_away(tmp_path):
    model = tiny_model()
    delta, specs = make_delta(model)
    named = dict(model.named_parameters())
    path = save_delta(tmp_path / "d", delta, specs, {"step": 1.0}, {n: named[n].detach().clone() for n in EDITED})
    assert (path / ORIGINALS_FILE).is_file()
    save_delta(path, delta, specs, {"step": 2.0})
    assert sorted(os.listdir(path)) == sorted([TENSORS_FILE, CONFIG_FILE])  # no stale original.safetensors
    with pytest.raises(DeltaError, match="saved without its original tensors"):
        slug_fast.revert_delta(model, path)


def test_applied_is_a_new_contiguous_tensor_on_the_originals_device():
    """applied(original, delta) for a transposed (non-contiguous) weight: a new contiguous
    tensor of the original's dtype holding original + delta (values on a 1/8 grid, so the sum
    is exact in every dtype and the float64 oracle is the answer), the original untouched; a
    delta on another device is moved to the original's (the meta device stands in for a GPU)."""
    from slug_fast.delta import applied

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        base = (torch.randint(-100, 100, (3, 5), generator=g) / 8).to(dtype)
        original = base.t()
        delta = torch.randint(-100, 100, (5, 3), generator=g) / 8
        out = applied(original, delta)
        assert out.is_contiguous() and out.shape == (5, 3) and out.dtype == dtype
        assert out.data_ptr() != original.data_ptr()
        assert torch.equal(out, (original.double() + delta.double()).to(dtype))
        assert torch.equal(original, base.t())
    on_meta = applied(torch.empty(3, 5, device="meta").t(), torch.ones(5, 3))
    assert on_meta.device.type == "meta" and on_meta.shape == (5, 3) and on_meta.is_contiguous()
