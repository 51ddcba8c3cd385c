"""`slug-fast unlearn` and `slug-fast apply` on models and data saved to disk, offline.

The model is the digits mini-CLIP saved in open_clip's "local-dir" format; the data are
its images written as PNGs into a WebDataset shard with captions, the way img2dataset
writes LAION shards.
"""
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import slug_fast
from slug_fast import digits

CLASSES = ",".join(digits.DIGIT_NAMES)


def write_shard(path, images, labels, data, gen):
    captions = digits.captions_for(labels, gen)
    with tarfile.open(path, "w") as tar:
        for i, (image, caption) in enumerate(zip(images, captions)):
            png = io.BytesIO()
            digits.to_pil(image, data).save(png, format="PNG")
            for ext, payload in (("png", png.getvalue()), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory, digits_trained):
    state, data = digits_trained
    root = tmp_path_factory.mktemp("jobs")
    model_dir = root / "model"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(json.dumps(digits.open_clip_config(data)))
    save_file({k: v.contiguous() for k, v in state.items()}, model_dir / "open_clip_model.safetensors")
    gen = torch.Generator().manual_seed(0)
    train = write_shard(root / "train.tar", data.train_images[:600], data.train_labels[:600], data, gen)
    test = write_shard(root / "test.tar", data.test_images, data.test_labels, data, gen)
    labelled = root / "labelled"  # ImageNet-val style: one folder of PNGs per class
    for i, (image, label) in enumerate(zip(data.test_images, data.test_labels.tolist())):
        folder = labelled / digits.DIGIT_NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        digits.to_pil(image, data).save(folder / f"{i:04d}.png")
    (root / "templates.txt").write_text("\n".join(digits.TEMPLATES) + "\n")
    captioned = root / "captioned"  # the held-out digits again, as an image folder with captions.tsv
    captioned.mkdir()
    lines = []
    for i, (image, caption) in enumerate(zip(data.test_images, digits.captions_for(data.test_labels, gen))):
        digits.to_pil(image, data).save(captioned / f"{i:04d}.png")
        lines.append(f"{i:04d}.png\t{caption}")
    (captioned / "captions.tsv").write_text("\n".join(lines) + "\n")
    return {"root": root, "model": model_dir, "train": train, "test": test, "labelled": labelled,
            "templates": root / "templates.txt", "captioned": captioned}


def run(*args):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "slug_fast", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env)


def test_unlearn_then_eval_and_apply_round_trip(saved, tmp_path, digits_trained):
    out = tmp_path / "run"
    res = run("unlearn", "--model", saved["model"], "--data", saved["train"], "--eval-data", saved["test"],
              "--concept", "seven", "--class-names", CLASSES, "--out", out, "--quiet", "--memory-budget", "2GB",
              "--checkpointing")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report == json.loads((out / "report.json").read_text())
    memory = report["unlearn"]["memory"]
    assert memory["budget_bytes"] == 2 * 10**9 and memory["checkpointing"] and memory["mode"] == "full"
    assert "gradient store: full, 1 pass(es)" in (out / "report.md").read_text()
    assert report["forget"]["top5_after"] == 0.0 and report["forget"]["top1_before"] > 50
    assert report["retain"]["top1_after"] > report["retain"]["top1_before"] - 25
    assert set(report["mia"]) == {"loss_before", "loss_after", "distance_before", "distance_after"}
    assert report["data"]["forget_pairs"] + report["data"]["retain_pairs"] == 600
    written = sorted(p.name for p in out.iterdir())
    assert written == ["delta", "pareto_text.png", "pareto_vision.png", "report.json", "report.md",
                       "similarity.png"]

    # eval scores the model as the report did: before without the delta, after with it, exactly
    scored = {}
    for when, delta in (("before", []), ("after", ["--delta", out / "delta"])):
        res = run("eval", "--model", saved["model"], *delta, "--data", saved["train"], "--eval-data", saved["test"],
                  "--concept", "seven", "--class-names", CLASSES, "--utility-data", saved["labelled"],
                  "--utility-templates", f"@{saved['templates']}", "--out", tmp_path / f"eval_{when}")
        assert res.returncode == 0, res.stderr
        scored[when] = json.loads(res.stdout)
        assert scored[when] == json.loads((tmp_path / f"eval_{when}" / "eval.json").read_text())
        scores = scored[when]["scores"]
        for j in (1, 5):
            assert scores[f"forget_top{j}"] == report["forget"][f"top{j}_{when}"]
            assert scores[f"others_top{j}"] == report["retain"][f"top{j}_{when}"]
        assert scores["mia"] == report["mia"][f"loss_{when}"]
        assert scores["mia_distance"] == report["mia"][f"distance_{when}"]
    assert scored["after"]["delta"]["changed"] == report["layer"] and scored["before"]["delta"] is None
    assert scored["after"]["data"]["utility_images"] == len(digits_trained[1].test_labels)
    assert scored["after"]["data"]["utility_classes"] == 10
    # utility: zero-shot top-1 on the labelled folder, brute force through open_clip and the digits' own scorer
    import open_clip
    paths = sorted(saved["labelled"].glob("*/*.png"))
    labels = torch.tensor([digits.DIGIT_NAMES.index(p.parent.name) for p in paths])
    for when in ("before", "after"):
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{saved['model']}")
        if when == "after":
            slug_fast.apply_delta(model, out / "delta")
        pixels = torch.stack([preprocess(Image.open(p)) for p in paths])
        expected = digits.zero_shot_accuracy(model.eval(), pixels, labels, 1)
        # the digits scorer averages in float32; one image is 100/270 points, so 1e-4 pins the count
        assert scored[when]["scores"]["utility_top1"] == pytest.approx(expected, abs=1e-4)

    applied = tmp_path / "applied"
    res = run("apply", "--model", saved["model"], "--delta", out / "delta", "--out", applied)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["changed"] == report["layer"]
    original = load_file(saved["model"] / "open_clip_model.safetensors")
    edited = load_file(applied / "open_clip_model.safetensors")
    delta = load_file(out / "delta" / "delta.safetensors")
    changed = [k for k in original if not torch.equal(original[k], edited[k])]
    assert changed == report["layer"]
    for name in changed:  # theta0 + delta in float32, the edit's own rounding
        assert torch.equal(edited[name], original[name] + delta[name])
    import open_clip
    reloaded = open_clip.create_model(f"local-dir:{applied}")
    assert torch.equal(reloaded.state_dict()[changed[0]], edited[changed[0]])


@pytest.mark.parametrize("args, message", [
    (["--concept", "eleven"], "no caption among"),
    (["--concept", "seven", "--class-names", "seven"], "at least one name besides the concept"),
    (["--concept", "seven", "--model", "/nonexistent/model"], "could not load '/nonexistent/model'"),
    (["--concept", "seven", "--memory-budget", "lots"], "memory_budget is bytes (an int) or a string like '12GB'"),
    (["--concept", "seven", "--memory-budget", "1000"], "memory_budget 1000 B is too small: the smallest plan"),
])
def test_unlearn_bad_input_exits_2_and_writes_nothing(saved, tmp_path, args, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("keep me")
    base = {"--model": saved["model"], "--data": saved["train"], "--class-names": CLASSES, "--out": out}
    given = dict(zip(args[::2], args[1::2]))
    argv = [x for k, v in {**base, **given}.items() for x in (k, v)]
    res = run("unlearn", *argv, "--quiet")
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["report.json"] and (out / "report.json").read_text() == "keep me"


def test_compare_on_a_saved_model_matches_unlearn_and_scores_every_method(saved, tmp_path):
    """compare --model: the model as loaded, then each method in its own process on the same data and
    criterion; SLUG's row is `slug-fast unlearn`'s run on the same inputs, scored as `eval` scores."""
    task = ["--model", saved["model"], "--data", saved["train"], "--eval-data", saved["captioned"], "--concept",
            "seven", "--class-names", CLASSES]
    res = run("unlearn", *task, "--out", tmp_path / "unlearn", "--quiet")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    res = run("compare", *task, "--utility-data", saved["labelled"], "--utility-templates", f"@{saved['templates']}",
              "--methods", "slug,ga", "--out", tmp_path / "compare", "--quiet")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["method"] for r in rows] == ["original", "slug", "ga"]
    assert rows == json.loads((tmp_path / "compare" / "compare.json").read_text())
    original, slug, ga = rows
    assert slug["setting"] == {"layer": report["layer"], "step": report["step"]} and slug["reached"]
    for row, when in ((original, "before"), (slug, "after")):
        for j in (1, 5):
            assert row[f"forget_top{j}"] == report["forget"][f"top{j}_{when}"]
            assert row[f"others_top{j}"] == report["retain"][f"top{j}_{when}"]
        assert row["mia"] == report["mia"][f"loss_{when}"]
    assert ga["reached"] and ga["forget_top5"] == 0.0 and ga["grid_seconds"] >= ga["seconds"] > 0
    assert slug["seconds"] == slug["grid_seconds"] > 0 and original["seconds"] == 0
    assert all(r["peak_rss_mb"] > 0 and r["peak_gpu_mb"] is None for r in rows)
    assert original["utility_top1"] > 50 and all(r["utility_top1"] is not None for r in rows)
    assert original["tried"] == [] and len(slug["tried"]) == len(report["unlearn"]["candidates"])
    assert any(t["reached"] for t in ga["tried"]) and all({"setting", "utility", "steps"} <= set(t) for t in ga["tried"])
    md = (tmp_path / "compare" / "compare.md").read_text()
    assert "| method | best setting | forget top-1 | forget top-5 | others top-1 | utility top-1 | MIA |" in md
    assert md.count("\n| original | - |") == 1
    ga_tried = [line for line in md.split("## ga: every setting tried")[1].splitlines() if line.startswith("| ")]
    assert len(ga_tried) >= 2 and any("| yes |" in line for line in ga_tried)  # the header, then each setting
    assert (tmp_path / "compare" / "compare.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--concept", "seven"], "--concept describes your model's task: give --model too"),
    (["--model", "{model}", "--class-names", CLASSES, "--data", "{train}"], "compare --model needs --concept"),
    (["--model", "{model}", "--concept", "seven", "--class-names", CLASSES], "needs --data (split by the concept)"),
    (["--model", "{model}", "--concept", "seven", "--class-names", "seven", "--data", "{train}"],
     "at least one name besides the concept"),
    (["--model", "{model}", "--concept", "seven", "--class-names", CLASSES, "--data", "{train}",
      "--utility-templates", "t.txt"], "--utility-templates takes @file"),
    (["--model", "/nonexistent", "--concept", "seven", "--class-names", CLASSES, "--data", "{train}",
      "--methods", "ga"], "method original failed: could not load '/nonexistent'"),
])
def test_compare_bad_input_exits_2_and_writes_nothing(saved, tmp_path, args, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "compare.json").write_text("keep me")
    res = run("compare", *[a.format(**saved) for a in args], "--out", out, "--quiet")
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert [p.name for p in out.iterdir()] == ["compare.json"] and (out / "compare.json").read_text() == "keep me"


@pytest.mark.parametrize("args, message", [
    (["--eval-data", None], "the following arguments are required: --eval-data"),
    (["--utility-classes", "imagenet"], "describe --utility-data; give the labelled folder too"),
    (["--utility-data", "{labelled}", "--utility-templates", "templates.txt"], "--utility-templates takes @file"),
    (["--utility-data", "{model}"], "has no subfolder; put each class's images in a subfolder"),
    (["--utility-data", "{labelled}", "--utility-classes", "a,b"], "2 class names for the 10 class folders"),
    (["--delta", "{root}"], "is not a slug_fast delta"),
    (["--data", "{train}", "--forget-data", "{train}"], "--data (split by the concept) or --forget-data, not both"),
    (["--concept", "eleven"], "no image is labelled 'eleven'"),
])
def test_eval_bad_input_exits_2_and_writes_nothing(saved, tmp_path, args, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.json").write_text("keep me")
    base = {"--model": saved["model"], "--eval-data": saved["test"], "--concept": "seven", "--class-names": CLASSES,
            "--out": out}
    given = {k: v if v is None else v.format(**saved) for k, v in zip(args[::2], args[1::2])}
    argv = [str(x) for k, v in {**base, **given}.items() if v is not None for x in (k, v)]
    res = run("eval", *argv)
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert [p.name for p in out.iterdir()] == ["eval.json"] and (out / "eval.json").read_text() == "keep me"


def test_apply_refuses_a_corrupt_delta(saved, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "delta_config.json").write_text("{}")
    (bad / "delta.safetensors").write_bytes(b"junk")
    res = run("apply", "--model", saved["model"], "--delta", bad, "--out", tmp_path / "applied")
    assert res.returncode == 2 and "is not a slug_fast.delta config" in res.stderr
    assert not (tmp_path / "applied").exists()


def test_unlearn_refuses_data_with_forget_data_and_bad_out_or_class_files_in_one_line(saved, tmp_path):
    """Each refused before the model loads: exit 2, one line, nothing written."""
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    latin1 = tmp_path / "names.txt"
    latin1.write_bytes("seven\nJos\xe9\n".encode("latin-1"))
    base = ["--model", saved["model"], "--concept", "seven", "--quiet"]
    cases = [
        (["--data", saved["train"], "--forget-data", saved["train"], "--class-names", CLASSES,
          "--out", tmp_path / "a"], "or both --forget-data and --retain-data, not both"),
        (["--data", saved["train"], "--class-names", CLASSES, "--out", blocker / "sub"],
         f"--out {blocker / 'sub'} cannot be created: {blocker} is a file, not a directory"),
        (["--data", saved["train"], "--class-names", f"@{latin1}", "--out", tmp_path / "b"],
         f"--class-names file {latin1} is not UTF-8 text"),
    ]
    for args, message in cases:
        res = run("unlearn", *base, *args)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert message in res.stderr and "Traceback" not in res.stderr
    assert blocker.read_text() == "keep me" and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_criterion_not_reached_is_exit_3(saved, tmp_path):
    """An outcome, not bad input: its own exit code, one line, nothing written."""
    res = run("unlearn", "--model", saved["model"], "--data", saved["train"], "--concept", "seven",
              "--class-names", CLASSES, "--out", tmp_path / "out", "--quiet", "--max-evals", "1", "--limit", "200",
              "--tower", "text")
    assert res.returncode == 3, res.stderr
    said = [line for line in res.stderr.splitlines() if line.startswith("slug-fast:")]  # beside logged warnings
    assert len(said) == 1 and said[0].startswith("slug-fast: criterion not reached:") and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
