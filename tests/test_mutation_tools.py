"""bench/mutation_score.py (the score and the hand-checked survivors) and bench/mutation_state.py
(mutmut's verdicts carried between machines), on hand-made results: mutmut itself is not run."""
import importlib.util
import json
import tarfile
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


score = load("mutation_score")
state = load("mutation_state")


def test_score_counts_listed_equivalents_as_killed_and_reports_stale_entries(tmp_path):
    a, b = "slug_fast.edit.x_axpy__mutmut_", "slug_fast.eval.mia.x_attack__mutmut_"
    results = [(a + "1", "killed"), (a + "2", "timeout"), (a + "3", "survived"), (a + "4", "survived"),
               (a + "5", "not checked"), (b + "1", "survived"), (b + "2", "no tests"), (b + "3", "killed"),
               (b + "4", "survived")]
    listed_file = tmp_path / "listed.tsv"
    listed_file.write_text("# comment\n\n" + "".join(f"{n}\t{k}\t{line}\twhy\n" for n, k, line in [
        (a + "3", "equivalent", "x = None"),  # counted as killed
        (a + "4", "cuda", "y.to(None)"),  # stays a survivor
        (b + "1", "equivalent", "not this line"),  # its mutated line changed: stale, counts as nothing
        (b + "3", "equivalent", "z = 1"),  # killed now: stale
        (b + "9", "equivalent", "w = 2"),  # no such mutant: stale
        (a + "5", "equivalent", "u = 3"),  # not checked yet: not stale
    ]))
    listed = score.read_listed(str(listed_file))
    lines = {a + "3": ["x = None"], a + "4": ["y.to(None)"], b + "1": ["the mutated line"], b + "4": ["v"]}
    counts, survivors, stale = score.tally(results, listed, lambda name: lines[name])
    edit, mia = score._row("edit", counts["slug_fast/edit.py"]), score._row("mia", counts["slug_fast/eval/mia.py"])
    # (module, mutants, killed, survived, no tests, not checked, score, equivalent, other, score with equivalents)
    assert edit == ("edit", 5, 2, 2, 0, 1, "50.0", 1, 1, "75.0")  # 2 of 4 checked; + 1 equivalent
    assert mia == ("mia", 4, 1, 2, 1, 0, "25.0", 0, 0, "25.0")  # "no tests" counts as survived
    assert survivors == [f"{a}3: survived (listed: equivalent)", f"{a}4: survived (listed: cuda)",
                         f"{b}1: survived", f"{b}2: no tests", f"{b}4: survived"]
    assert sorted(s.split(":")[0] for s in stale) == [b + "1", b + "3", b + "9"]
    listed_file.write_text(f"{a}3\tprobably\tx = None\twhy\n")
    with pytest.raises(SystemExit, match="kind one of"):
        score.read_listed(str(listed_file))


def write_mutants(root, meta=None):
    (root / "slug_fast" / "eval").mkdir(parents=True)
    (root / "slug_fast" / "edit.py.meta").write_text(json.dumps(meta or {"exit_code_by_key": {"m1": 1}}))
    (root / "slug_fast" / "eval" / "mia.py.meta").write_text(json.dumps({"exit_code_by_key": {"m2": 0}}))
    (root / "mutmut-stats.json").write_text(json.dumps({"duration_by_test": {"t": 0.1}}))
    (root / "slug_fast" / "edit.py").write_text("# a generated mutant file: not saved\n")


def test_state_round_trips_the_verdicts_and_stats_only(tmp_path, capsys):
    source, target, saved = tmp_path / "a" / "mutants", tmp_path / "b" / "mutants", tmp_path / "state.tar.xz"
    write_mutants(source)
    state.save(source, saved)
    assert not saved.with_name(saved.name + ".tmp").exists()
    state.restore(target, saved, force=False)
    got = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert got == ["mutmut-stats.json", "slug_fast/edit.py.meta", "slug_fast/eval/mia.py.meta"]
    for f in got:
        assert (target / f).read_bytes() == (source / f).read_bytes()
    with pytest.raises(SystemExit, match="already holds verdicts; --force"):
        state.restore(target, saved, force=False)  # never over verdicts without asking
    (target / "slug_fast" / "edit.py.meta").write_text("{}")
    state.restore(target, saved, force=True)
    assert (target / "slug_fast" / "edit.py.meta").read_bytes() == (source / "slug_fast" / "edit.py.meta").read_bytes()


def test_state_refuses_a_half_written_verdict_and_foreign_archive_members(tmp_path):
    mutants, saved = tmp_path / "mutants", tmp_path / "state.tar.xz"
    write_mutants(mutants)
    saved.write_bytes(b"the previous state")
    (mutants / "slug_fast" / "eval" / "mia.py.meta").write_text('{"exit_code_by_key": {"m2"')  # cut mid-write
    with pytest.raises(SystemExit, match=r"mia.py.meta is not whole JSON .*stopped while writing"):
        state.save(mutants, saved)
    assert saved.read_bytes() == b"the previous state"  # kept
    with pytest.raises(SystemExit, match="no mutmut results"):
        state.save(tmp_path / "empty", saved)
    evil = tmp_path / "evil.tar.xz"
    (tmp_path / "x.meta").write_text("{}")
    with tarfile.open(evil, "w:xz") as tar:
        tar.add(tmp_path / "x.meta", arcname="../outside.meta")
    with pytest.raises(SystemExit, match="unexpected member '../outside.meta'"):
        state.restore(tmp_path / "fresh", evil, force=False)
    assert not (tmp_path / "outside.meta").exists()


def test_run_launcher_hands_each_mutant_its_tests_fastest_first(monkeypatch):
    """bench/mutation_run.py: the runner's submit gets the tests sorted by mutmut's measured
    durations (ties and unmeasured tests by name), the rest of its arguments untouched."""
    pytest.importorskip("mutmut", reason="mutmut is a dev extra")
    from mutmut.state import state as mutmut_state
    from mutmut.workers import isolation

    submitted = []

    class Recorder:
        def submit(self, mutant_name, tests, cpu_time_limit, estimated_time):
            submitted.append((mutant_name, tests, cpu_time_limit, estimated_time))

    monkeypatch.setattr(isolation, "ForkServerRunner", Recorder)
    monkeypatch.setattr(isolation, "ForkRunner", type("Other", (Recorder,), {}))
    launcher = load("mutation_run")
    durations = {"t::slow": 40.0, "t::quick": 0.5, "t::b_tie": 2.0, "t::a_tie": 2.0}
    monkeypatch.setattr(mutmut_state(), "duration_by_test", durations)
    tests = ["t::slow", "t::b_tie", "t::unmeasured", "t::quick", "t::a_tie"]
    assert launcher.fastest_first(tests) == ["t::unmeasured", "t::quick", "t::a_tie", "t::b_tie", "t::slow"]
    Recorder().submit("m__mutmut_1", list(tests), 30, 12.5)
    isolation.ForkRunner().submit("m__mutmut_2", ["t::slow", "t::quick"], 9, 1.0)
    assert submitted == [("m__mutmut_1", ["t::unmeasured", "t::quick", "t::a_tie", "t::b_tie", "t::slow"], 30, 12.5),
                         ("m__mutmut_2", ["t::quick", "t::slow"], 9, 1.0)]
