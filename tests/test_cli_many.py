"""`slug-fast unlearn` with several concepts (--concept repeated, or --concepts @file):
unlearn_many on a model and data saved to disk, offline (test_cli_jobs's digits mini-CLIP
in open_clip's "local-dir" format and its WebDataset shards)."""
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_cli_jobs import CLASSES, run, saved  # noqa: F401  (saved: the fixture)

from slug_fast.errors import SlugError
from slug_fast.job import concept_list
from slug_fast.report import pareto_plots

TWO = ["--concept", "seven", "--concept", "three"]


def test_two_concepts_forgotten_into_one_revertible_delta_that_applies_and_reverts(saved, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    res = run("unlearn", "--model", saved["model"], "--data", saved["train"], "--eval-data", saved["test"], *TWO,
              "--class-names", CLASSES, "--out", out, "--quiet", "--order", "importance")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report == json.loads((out / "report.json").read_text())
    assert report["concepts"] == ["seven", "three"] and sorted(report["unlearn"]["order"]) == ["seven", "three"]
    for concept in ("seven", "three"):  # each digit forgotten: its top-5 was high, is 0 now
        assert report["forget"][f"{concept}_top5_after"] == 0.0 and report["forget"][f"{concept}_top1_before"] > 50
        assert report["layer"][concept] == report["unlearn"]["concepts"][concept]["edited"]
        assert report["step"][concept] == report["unlearn"]["concepts"][concept]["step"] > 0
    assert set(report["forget"]) == {f"{c}_top{j}_{w}" for c in ("seven", "three") for j in (1, 5)
                                     for w in ("before", "after")}
    # the eight digits kept (top-5 = 0 on two digits of a 4-epoch mini-CLIP costs some): far above chance (10%)
    assert report["retain"]["top1_before"] > 70 and report["retain"]["top1_after"] > 40
    grid = report["unlearn"]["interference"]
    assert grid["after"][0] == "before" and grid["satisfied"][0] == [False, False] and all(grid["satisfied"][-1])
    data = report["data"]  # digits captions name one digit each: the split is a partition
    assert data["forget_pairs"]["seven"] > 30 and data["forget_pairs"]["three"] > 30
    assert sum(data["forget_pairs"].values()) + data["retain_pairs"] == 600 and data["eval_images"] > 100
    written = sorted(p.name for p in out.iterdir())
    towers = sorted(report["unlearn"]["concepts"]["seven"]["fronts"])
    assert written == sorted(["delta", "interference.png", "report.json", "report.md", "similarity.png",
                              *(f"pareto_{c}_{t}.png" for c in ("seven", "three") for t in towers)])
    assert (out / "interference.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "delta").iterdir()) == ["delta.safetensors", "delta_config.json",
                                                                 "original.safetensors"]
    config = json.loads((out / "delta" / "delta_config.json").read_text())
    assert config["method"] == "slug-many" and [c["name"] for c in config["concepts"]] == report["unlearn"]["order"]
    md = (out / "report.md").read_text()
    assert md.startswith("# Unlearning report: seven, three") and "| forget seven_top5 | " in md
    assert "## Interference" in md

    applied, restored = tmp_path / "applied", tmp_path / "restored"
    res = run("apply", "--model", saved["model"], "--delta", out / "delta", "--out", applied)
    assert res.returncode == 0, res.stderr
    base = load_file(saved["model"] / "open_clip_model.safetensors")
    edited = load_file(applied / "open_clip_model.safetensors")
    changed = sorted(k for k in base if not torch.equal(base[k], edited[k]))
    assert changed == sorted({n for layers in report["layer"].values() for n in layers})
    res = run("revert", "--model", applied, "--delta", out / "delta", "--out", restored)
    assert res.returncode == 0, res.stderr
    back = load_file(restored / "open_clip_model.safetensors")
    assert sorted(back) == sorted(base) and all(torch.equal(back[k], base[k]) for k in base)  # bit for bit


@pytest.mark.parametrize("args, message", [
    ([*TWO, "--alias", "7"], "with several concepts give each one's aliases in a --concepts @file"),
    ([*TWO, "--forget-data", "{train}"], "--forget-data and --retain-data hold one concept's pairs"),
    (["--concept", "seven", "--concept", "Seven"], "'Seven' is given twice with --concept"),
    (["--concepts", "@{missing}"], "--concepts file {missing} not found"),
    ([*TWO, "--memory-budget", "2GB"], "leave --memory-budget out"),
    ([*TWO, "--concepts", "@{missing}"], "either as --concept NAME (repeatable) or as --concepts @file, not both"),
    (["--concept", "seven", "--order", "given"], "with one concept leave them out"),
    (["--concept", "seven", "--share-layers"], "with one concept leave them out"),
    ([], "give the concept to forget: --concept NAME (repeatable) or --concepts @file"),
    (["--concept", "seven", "--concept", "eleven"], "no caption among"),
])
def test_bad_input_with_several_concepts_exits_2_in_one_line_and_writes_nothing(saved, tmp_path, args,  # noqa: F811
                                                                                  message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("keep me")
    fill = {"train": saved["train"], "missing": tmp_path / "nope.txt"}
    args = [a.format(**fill) for a in args]
    res = run("unlearn", "--model", saved["model"], "--data", saved["train"], "--class-names", CLASSES,
              "--out", out, "--quiet", *args)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and message.format(**fill) in res.stderr, res.stderr
    assert res.stdout == "" and [p.name for p in out.iterdir()] == ["report.json"]
    assert (out / "report.json").read_text() == "keep me"


def test_several_concepts_need_data_to_split(saved, tmp_path):  # noqa: F811
    res = run("unlearn", "--model", saved["model"], *TWO, "--class-names", CLASSES, "--out", tmp_path / "o")
    assert res.returncode == 2 and "give --data SRC" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_several_concepts_criterion_not_reached_is_exit_3_and_writes_nothing(saved, tmp_path):  # noqa: F811
    listed = tmp_path / "concepts.txt"
    listed.write_text("seven\nthree\n")
    res = run("unlearn", "--model", saved["model"], "--data", saved["train"], "--concepts", f"@{listed}",
              "--class-names", CLASSES, "--out", tmp_path / "out", "--quiet", "--max-evals", "1", "--limit", "200",
              "--tower", "text")
    assert res.returncode == 3, res.stderr
    said = [line for line in res.stderr.splitlines() if line.startswith("slug-fast:")]
    assert len(said) == 1 and said[0].startswith("slug-fast: criterion not reached:") and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_concept_list_reads_names_aliases_and_comments_and_refuses_a_name_twice(tmp_path):
    listed = tmp_path / "concepts.txt"
    listed.write_text("# people to forget\n\nElon Musk | Musk |  Elon  \n  Ann\n# the end\n", encoding="utf-8")
    assert concept_list(concepts_file=f"@{listed}") == {"Elon Musk": ("Musk", "Elon"), "Ann": ()}
    assert concept_list(["seven"], aliases=["7", "VII"]) == {"seven": ("7", "VII")}
    assert concept_list(["seven", "three"]) == {"seven": (), "three": ()}
    listed.write_text("Elon Musk | Musk\nmusk\n")  # an alias of one is the other's name
    with pytest.raises(SlugError, match="'musk' is given twice in --concepts file"):
        concept_list(concepts_file=f"@{listed}")
    for bad, message in [({"concepts": ["Elon  Musk", "elon musk"]}, "is given twice with --concept"),
                         ({"concepts_file": str(listed)}, "--concepts takes @file"),
                         ({"concepts": ["a", " "]}, "an empty concept name or alias"),
                         ({"concepts": ["a", "b"], "aliases": ["c"]}, "--alias spells the one concept")]:
        with pytest.raises(SlugError, match=message):
            concept_list(**bad)
    listed.write_text("# nothing\n\n")
    with pytest.raises(SlugError, match="lists no concept"):
        concept_list(concepts_file=f"@{listed}")


def test_pareto_files_of_concepts_are_plain_file_names():
    def concept(name):
        return SimpleNamespace(name=name, fronts={"vision": ["a"]}, tower_members={"vision": ["a"]},
                               stats=SimpleNamespace(names=["a"]), layers=["a"])

    result = SimpleNamespace(concepts={n: concept(n) for n in ("AC/DC", "AC DC", "Zoë K.", "..")})
    files = [name for name, _ in pareto_plots(result).values()]
    assert files == ["pareto_AC_DC_1_vision.png", "pareto_AC_DC_2_vision.png", "pareto_Zoë_K._vision.png",
                     "pareto_concept4_vision.png"]
