"""The command-line jobs on real models and data: `slug-fast unlearn`, `eval`, `apply` and `revert`."""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .data import concept_pattern, label_by_class, read_source, shard, split_by_concept
from .delta import apply_delta, check_revertible, load_delta, revert_delta
from .errors import SlugError
from .files import check_dir_target
from .loading import load_model, save_model

SIMILARITY_SAMPLE = 12  # pairs of each set shown in the before/after similarity plot


def _file_lines(arg: str, flag: str, layout: str) -> list[str]:
    """The lines of the UTF-8 file "@path" names; `flag` and `layout` (how it should read) say
    what went wrong."""
    path = Path(arg[1:])
    if not path.is_file():
        raise SlugError(f"{flag} file {path} not found")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise SlugError(f"{flag} file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8 with "
                        f"{layout}") from None
    except OSError as err:
        raise SlugError(f"{flag} file {path} cannot be read: {err.strerror or err}") from None


def _class_list(class_names: str | None, concepts: Sequence[str]) -> list[str]:
    """Class names from "a,b,c" or "@file" (one per line); the concepts missing are put first."""
    if not class_names:
        raise SlugError("--class-names is required: the concept and other names for zero-shot classification, "
                        "as 'a,b,c' or @file with one name per line")
    if class_names.startswith("@"):
        names = [line.strip() for line in _file_lines(class_names, "--class-names", "one name per line")]
    else:
        names = [n.strip() for n in class_names.split(",")]
    names = list(dict.fromkeys(n for n in names if n))
    names = [c for c in concepts if c not in names] + names
    if len(names) <= len(concepts):
        which = f"the concept {concepts[0]!r}" if len(concepts) == 1 else \
            f"the concepts {', '.join(map(repr, concepts))}"
        raise SlugError(f"--class-names needs at least one name besides {which}")
    return names


def concept_list(concepts: Sequence[str] = (), concepts_file: str | None = None,
                 aliases: Sequence[str] = ()) -> dict[str, tuple[str, ...]]:
    """name -> aliases of the concepts to forget, from --concept NAME (repeatable) or
    --concepts @file: one concept a line, its aliases after the name behind `|` ("Elon Musk |
    Musk"), blank lines and lines starting with # ignored. --alias adds aliases to the one
    concept there is. A name or alias given for two concepts (any case) is refused."""
    if concepts and concepts_file is not None:
        raise SlugError("give the concepts either as --concept NAME (repeatable) or as --concepts @file, not both")
    if concepts_file is not None:
        if not concepts_file.startswith("@"):
            raise SlugError(f"--concepts takes @file (one concept per line), got {concepts_file!r}; name concepts "
                            "on the command line with --concept NAME (repeatable)")
        layout = "one concept per line, aliases after '|'"
        lines = [line for line in _file_lines(concepts_file, "--concepts", layout)
                 if line.strip() and not line.lstrip().startswith("#")]
        entries = [[part.strip() for part in line.split("|")] for line in lines]
        if not entries:
            raise SlugError(f"--concepts file {concepts_file[1:]} lists no concept; write {layout}")
        where = f"in --concepts file {concepts_file[1:]}"
    elif concepts:
        entries, where = [[name.strip()] for name in concepts], "with --concept"
    else:
        raise SlugError("give the concept to forget: --concept NAME (repeatable) or --concepts @file")
    if aliases:
        if len(entries) > 1:
            raise SlugError("--alias spells the one concept another way; with several concepts give each one's "
                            "aliases in a --concepts @file, after its name behind '|': 'Elon Musk | Musk'")
        entries[0] += [a.strip() for a in aliases]
    owner: dict[str, int] = {}  # a spelling (any case, any spacing) -> the entry that gives it
    for i, entry in enumerate(entries):
        if not all(entry):
            raise SlugError(f"an empty concept name or alias {where}: {' | '.join(entry)!r}")
        for name in entry:
            key = " ".join(name.split()).casefold()
            if owner.setdefault(key, i) != i:
                raise SlugError(f"{name!r} is given twice {where}; give each concept once and each alias to one "
                                "concept")
    return {entry[0]: tuple(dict.fromkeys(entry[1:])) for entry in entries}


def check_out_dir(out: str | Path, flag: str = "--out") -> Path:
    """`out` as a Path, refused before any work unless it is a writable directory or can be
    created as one."""
    return check_dir_target(out, flag, writable=True)


def run_unlearn(model: str, concept: str, out: str | Path, *, pretrained: str | None = None,
                data: str | None = None, forget_data: str | None = None, retain_data: str | None = None,
                eval_data: str | None = None, class_names: str | None = None, aliases: tuple[str, ...] = (),
                k: int = 5, strategy: str = "best", tower: str | None = None, max_evals: int = 10,
                batch_size: int = 32, limit: int | None = None, device: str = "cpu",
                memory_budget: int | str | None = None, checkpointing: bool = False,
                progress: bool | None = None, ranks=None) -> dict | None:
    """Unlearn `concept` from a CLIP model with SLUG and write the delta and the report to `out`.

    Data: `data` (split by whether a caption mentions the concept) or `forget_data` and
    `retain_data`. The criterion is the paper's: the concept's zero-shot top-k accuracy
    among `class_names` is 0, on `eval_data` (captions naming one class label an image)
    or else on the forget images and the retain images that name another class.
    memory_budget and checkpointing go to `unlearn` (see there).
    ranks (slug_fast.distributed.Ranks): run as one of several processes (torchrun). Every
    rank reads the data and loads the model; each takes its share of the forget and retain
    pairs and of the evaluation images; only rank 0 measures the similarity and membership
    inference, writes `out` and returns the report (the others return None). A failure on
    any rank stops every rank with the failing rank's message.
    """
    from .eval.mia import clip_membership_inference
    from .eval.zero_shot import concept_criterion
    from .report import write_outputs
    from .unlearn import unlearn

    from .memory import parse_budget

    t0 = time.perf_counter()
    out = check_out_dir(out)
    budget = parse_budget(memory_budget)  # refuse a bad budget before loading anything
    names = _class_list(class_names, [concept])
    if ranks is not None and budget is not None:
        raise SlugError("--memory-budget plans one process's gradients; on several processes each rank keeps 1/N "
                        "of them (leave --memory-budget out)")

    def prepare():
        return _prepare(model, concept, names, pretrained, data, forget_data, retain_data, eval_data, aliases, limit,
                        device)

    # every rank loads; one failing stops them all before any collective could wait on it
    forget_pairs, retain_pairs, eval_images, eval_labels, held_out, adapter = \
        prepare() if ranks is None else ranks.agree(prepare, "reading the data and loading the model")
    t_load = time.perf_counter() - t0
    writer = ranks is None or ranks.rank == 0

    criterion = concept_criterion(adapter, eval_images, eval_labels, names, concept, k=k,
                                  process_group=None if ranks is None else ranks.group or "world")
    judge = (lambda: criterion(adapter.model)[1]) if ranks is None else \
        (lambda: ranks.decide(lambda: criterion(adapter.model)[1], "judging the model"))
    before = judge()
    if writer:
        similarity = _similarity_watch(adapter, [forget_pairs, retain_pairs])
        mia_before = clip_membership_inference(adapter, forget_pairs, held_out) if held_out else None

    forget = _batches(adapter, forget_pairs, batch_size, ranks)
    retain = _batches(adapter, retain_pairs, batch_size, ranks)
    result = unlearn(adapter, forget, retain, criterion, strategy=strategy, tower=tower, max_evals=max_evals,
                     memory_budget=budget, checkpointing=checkpointing, progress=progress if writer else False,
                     process_group=None if ranks is None else ranks.group)

    after = judge()
    if not writer:
        return None
    ks = sorted({1, k})
    report = {
        "concept": concept,
        "model": _model_info(model, pretrained, adapter),
        "layer": result.edited,
        "step": result.step,
        "criterion": f"forget top-{k} zero-shot accuracy among {len(names)} classes is 0",
        "forget": _before_after(before, after, "forget_top{}", ks),
        "retain": _before_after(before, after, "others_top{}", ks),
        "similarity": similarity.finish(),
        "data": {"forget_pairs": len(forget_pairs), "retain_pairs": len(retain_pairs),
                 "eval_images": len(eval_images), "skipped": {
                     "forget": forget_pairs.skip_counts(), "retain": retain_pairs.skip_counts()}},
        "seconds": _seconds(result, t_load),
        "unlearn": result.to_dict(),
    }
    if mia_before is not None:
        mia_after = clip_membership_inference(adapter, forget_pairs, held_out)
        report["mia"] = {f"{kind}_{when}": res[kind].mean for kind in ("loss", "distance")
                         for when, res in (("before", mia_before), ("after", mia_after))}
    report["files"] = write_outputs(out, report, result, _similarity_plot(report, similarity, out, concept))
    return report


def run_unlearn_many(model: str, concepts: Mapping[str, Sequence[str]], data: str, out: str | Path, *,
                     pretrained: str | None = None, eval_data: str | None = None, class_names: str | None = None,
                     k: int = 5, order: str = "given", share_layers: bool = False, strategy: str = "best",
                     tower: str | None = None, max_evals: int = 10, batch_size: int = 32, limit: int | None = None,
                     device: str = "cpu", checkpointing: bool = False, progress: bool | None = None) -> dict:
    """Unlearn several concepts (name -> aliases) from a CLIP model at once with
    slug_fast.unlearn_many and write the one revertible delta and the report to `out`.

    `data` is split by concept (slug_fast.data.split_by_concepts): each concept forgets the
    pairs whose caption mentions it (a caption naming two is in both sets), the pairs naming
    none are retained. Each concept's criterion is `run_unlearn`'s, among `class_names` with
    every concept in it, on `eval_data` or else on each concept's forget images and the
    retain images that name another class. `order` and `share_layers` go to unlearn_many;
    one process only, and every concept's gradients stay in memory (no memory budget).
    """
    from .data import split_by_concepts
    from .eval.zero_shot import concept_criterion
    from .many import unlearn_many
    from .report import plot_interference, write_outputs

    t0 = time.perf_counter()
    out = check_out_dir(out)
    if len(concepts) < 2:
        raise SlugError("run_unlearn_many needs at least two concepts; run_unlearn forgets one")
    names = _class_list(class_names, list(concepts))
    source = read_source(data, limit)
    forgets, retain_pairs = split_by_concepts(source, concepts)
    eval_pairs = read_source(eval_data, limit) if eval_data is not None else None
    eval_images, eval_labels = _eval_set(forgets, retain_pairs, names, eval_pairs)
    adapter = load_model(model, pretrained, device)
    t_load = time.perf_counter() - t0

    pixels = adapter.pixels(eval_images)  # once for every concept's criterion
    criteria = {c: concept_criterion(adapter, pixels, eval_labels, names, c, k=k) for c in concepts}
    ks = sorted({1, k})
    kept = _kept_classes(adapter, pixels, eval_labels, names, concepts, ks)
    before = {c: criterion(adapter.model)[1] for c, criterion in criteria.items()}
    kept_before = kept()
    similarity = _similarity_watch(adapter, [*forgets.values(), retain_pairs])

    result = unlearn_many(adapter, {c: (_batches(adapter, forgets[c], batch_size, None), criteria[c])
                                    for c in concepts}, _batches(adapter, retain_pairs, batch_size, None),
                          order=order, share_layers=share_layers, strategy=strategy, tower=tower,
                          max_evals=max_evals, checkpointing=checkpointing, progress=progress)
    after = {c: criterion(adapter.model)[1] for c, criterion in criteria.items()}
    report = {
        "concepts": list(concepts),
        "model": _model_info(model, pretrained, adapter),
        "layer": {c: r.edited for c, r in result.concepts.items()},
        "step": {c: r.step for c, r in result.concepts.items()},
        "criterion": f"each concept's forget top-{k} zero-shot accuracy among {len(names)} classes is 0",
        "forget": {key: value for c in concepts
                   for key, value in _before_after(before[c], after[c], "forget_top{}", ks, f"{c}_").items()},
        "retain": _before_after(kept_before, kept(), "top{}", ks),
        "similarity": similarity.finish(),
        "data": {"forget_pairs": {c: len(pairs) for c, pairs in forgets.items()}, "retain_pairs": len(retain_pairs),
                 "eval_images": len(eval_images), "skipped": source.skip_counts()},
        "seconds": _seconds(result, t_load),
        "unlearn": result.to_dict(),
    }
    shown = ", ".join(concepts)
    extra = {**_similarity_plot(report, similarity, out, shown), "interference": ("interference.png", lambda path:
             plot_interference(result.interference, path, f"forgetting {shown}: every criterion after each edit"))}
    report["files"] = write_outputs(out, report, result, extra)
    return report


def _model_info(model: str, pretrained: str | None, adapter) -> dict:
    return {"name": model, "pretrained": pretrained, "adapter": adapter.name}


def _before_after(before: dict, after: dict, metric: str, ks: Sequence[int], prefix: str = "") -> dict:
    """{prefix + "top{j}_before"/"_after": the metric ("forget_top{}") at j} for each j of ks."""
    return {f"{prefix}top{j}_{when}": m[metric.format(j)] for j in ks for when, m in (("before", before),
                                                                                       ("after", after))}


def _seconds(result, t_load: float) -> dict[str, float]:
    return {**{k: round(v, 4) for k, v in result.seconds.items()}, "load": round(t_load, 4)}


def _similarity_watch(adapter, pair_sets: Sequence):
    """A SimilarityWatch over the first pairs of each set (SIMILARITY_SAMPLE in all for the
    forget sets together, as many again of the last, the retain set)."""
    from .eval.similarity import SimilarityWatch

    *forgets, retain = pair_sets
    each = -(-SIMILARITY_SAMPLE // len(forgets))
    return SimilarityWatch(adapter, [pair for pairs in forgets for pair in pairs[:each]]
                           + list(retain[:SIMILARITY_SAMPLE]))


def _similarity_plot(report: dict, similarity, out: Path, shown: str) -> dict:
    """write_outputs' entry for similarity.png; the report's "similarity" names the plot."""
    report["similarity"]["plot"] = str(out / "similarity.png")
    return {"similarity": ("similarity.png",
                           lambda path: similarity.plot(path, f"image-text similarity, forgetting {shown}"))}


def _kept_classes(adapter, pixels, labels: Sequence[int], names: Sequence[str], concepts, ks: Sequence[int]):
    """kept() -> {"top{j}": the mean per-class zero-shot top-j accuracy (percent) of the
    evaluation images of the classes that are no concept (None without any)}."""
    import torch

    from .eval.zero_shot import IDENTITY_TEMPLATES, ZeroShotClassifier, encode_images

    classifier = ZeroShotClassifier(adapter, names, IDENTITY_TEMPLATES)
    label_ids = torch.tensor(list(labels), dtype=torch.int64)
    counts = torch.bincount(label_ids, minlength=len(names)).tolist()
    kept = [c for c, name in enumerate(names) if name not in concepts and counts[c] > 0]

    def accuracy() -> dict[str, float | None]:
        hits = classifier.hits(label_ids, ks, features=encode_images(adapter, pixels))
        return {f"top{j}": sum(100.0 * hits[j][label_ids == c].sum().item() / counts[c] for c in kept) / len(kept)
                if kept else None for j in ks}

    return accuracy


def _batches(adapter, pairs, batch_size: int, ranks) -> list:
    """This rank's batches: whole batches of the single-process split, shared out by rank
    (a contrastive loss depends on which pairs share a batch, so pairs are never re-batched)."""
    starts = range(0, len(pairs), batch_size)
    if ranks is not None:
        starts = shard(starts, ranks.rank, ranks.world)
    return [batch for i in starts for batch in adapter.make_batches(pairs[i:i + batch_size], batch_size)]


def _prepare(model, concept, names, pretrained, data, forget_data, retain_data, eval_data, aliases, limit, device):
    """(forget pairs, retain pairs, evaluation images, their labels, held-out concept pairs, adapter)."""
    if data is not None and (forget_data is not None or retain_data is not None):
        raise SlugError("give either --data (split by the concept) or both --forget-data and --retain-data, not both")
    if data is None and (forget_data is None or retain_data is None):
        raise SlugError("give either --data (split by the concept) or both --forget-data and --retain-data")
    if data is not None:
        forget_pairs, retain_pairs = split_by_concept(read_source(data, limit), [concept, *aliases])
    else:
        forget_pairs, retain_pairs = read_source(forget_data, limit), read_source(retain_data, limit)
    eval_pairs = read_source(eval_data, limit) if eval_data is not None else None
    eval_images, eval_labels = _eval_set({concept: forget_pairs}, retain_pairs, names, eval_pairs)
    mentions = concept_pattern([concept, *aliases])
    held_out = [pair for pair in eval_pairs or () if mentions.search(pair[1])]  # MIA's non-members
    adapter = load_model(model, pretrained, device)
    return forget_pairs, retain_pairs, eval_images, eval_labels, held_out, adapter


def _eval_set(forgets: Mapping[str, Sequence], retain_pairs: Sequence, names: Sequence[str],
              eval_pairs: Sequence | None) -> tuple[list, list[int]]:
    """(images, class indices) the criteria judge: `eval_pairs` labelled by the one class their
    caption names or, without them, each concept's forget images labelled with the concept
    and the retain images that name one class."""
    if eval_pairs is not None:
        labelled = label_by_class(eval_pairs, names)
        return labelled.images, labelled.labels
    others = label_by_class(retain_pairs, names)
    images = [im for pairs in forgets.values() for im, _ in pairs] + others.images
    labels = [names.index(c) for c, pairs in forgets.items() for _ in pairs] + others.labels
    return images, labels


def utility_set(folder: str, classes: str | None = None, per_class: int | None = None):
    """The labelled images of `folder` (slug_fast.data.read_labelled_folder) with their class
    names: the folder names (None), "imagenet" (open_clip's names of ImageNet's 1000 classes,
    for its sorted WordNet-id folders), "@file" (a map: "folder<TAB>name" lines) or "a,b,c"
    (one name per folder, in sorted order)."""
    from .data import read_labelled_folder

    if classes is None:
        names = None
    elif classes == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
        names = list(IMAGENET_CLASSNAMES)
    elif classes.startswith("@"):
        names = classes[1:]
    else:
        names = [n.strip() for n in classes.split(",") if n.strip()]
    return read_labelled_folder(folder, names, per_class=per_class)


def template_list(templates: str | None, default: Sequence[str]) -> list[str]:
    """Zero-shot templates from "@file" (one a line, "{}" where the class name goes), else `default`."""
    if templates is None:
        return list(default)
    if not templates.startswith("@"):
        raise SlugError(f"--utility-templates takes @file (one template a line, with '{{}}' for the class name), "
                        f"got {templates!r}")
    lines = [line.strip() for line in _file_lines(templates, "--utility-templates", "one template per line")]
    found = [line for line in lines if line and not line.startswith("#")]
    bad = [t for t in found if "{}" not in t]
    if not found or bad:
        raise SlugError(f"--utility-templates file {templates[1:]}: every template needs a '{{}}' where the class "
                        f"name goes, e.g. 'a photo of a {{}}.'; got {bad[:3] or 'no templates'}")
    return found


def run_eval(model: str, concept: str, out: str | Path, *, pretrained: str | None = None, delta: str | None = None,
             verify_base: bool = True, class_names: str | None = None, eval_data: str | None = None,
             data: str | None = None, forget_data: str | None = None, aliases: tuple[str, ...] = (),
             utility_data: str | None = None, utility_classes: str | None = None,
             utility_templates: str | None = None, utility_per_class: int | None = None, k: int = 5,
             limit: int | None = None, device: str = "cpu") -> dict:
    """Score one model (with `delta` applied, if given) on the paper's Table 1 metrics
    (slug_fast.eval.table_scores) and write eval.json to `out`.

    The concept's and the other classes' accuracy are judged on `eval_data` (captions
    naming one of `class_names` label the images), as `run_unlearn` judges them: with the
    same data, the scores of its delta equal its report's after-numbers. Membership
    inference needs the pairs trained on: `data` (the pairs whose caption mentions the
    concept) or `forget_data`, against the `eval_data` pairs that mention it. Utility is
    zero-shot top-1 on the labelled folder `utility_data` (see `utility_set`).
    """
    from .eval.benchmark import table_scores
    from .eval.zero_shot import OBJECT_TEMPLATES
    from .files import write_json_atomic

    t0 = time.perf_counter()
    out = check_out_dir(out)
    names = _class_list(class_names, [concept])
    if eval_data is None:
        raise SlugError("--eval-data is required: held-out captioned images, each caption naming one of the "
                        "class names")
    if data is not None and forget_data is not None:
        raise SlugError("give the pairs trained on as --data (split by the concept) or --forget-data, not both")
    if utility_data is None and (utility_classes is not None or utility_templates is not None
                                 or utility_per_class is not None):
        raise SlugError("--utility-classes, --utility-templates and --utility-per-class describe --utility-data; "
                        "give the labelled folder too")
    templates = template_list(utility_templates, OBJECT_TEMPLATES)
    if delta is not None:
        load_delta(delta)  # refuse a bad delta before loading anything big
    eval_pairs = read_source(eval_data, limit)
    labelled = label_by_class(eval_pairs, names)
    mentions = concept_pattern([concept, *aliases])
    held_out = [pair for pair in eval_pairs if mentions.search(pair[1])]
    if data is not None:
        forget_pairs = split_by_concept(read_source(data, limit), [concept, *aliases]).forget
    else:
        forget_pairs = read_source(forget_data, limit) if forget_data is not None else None
    utility = utility_set(utility_data, utility_classes, utility_per_class) if utility_data is not None else None
    adapter = load_model(model, pretrained, device)
    changed = apply_delta(adapter.model, delta, verify_base=verify_base) if delta is not None else []
    t_load = time.perf_counter() - t0
    scores = table_scores(adapter, labelled.images, labelled.labels, names, concept, k=k, utility=utility,
                          utility_templates=templates, forget_pairs=forget_pairs,
                          held_out_pairs=held_out if forget_pairs is not None else None)
    report = {
        "concept": concept,
        "model": _model_info(model, pretrained, adapter),
        "delta": {"path": str(delta), "changed": changed} if delta is not None else None,
        "scores": scores,
        "data": {"eval_images": len(labelled.images), "held_out_pairs": len(held_out),
                 "forget_pairs": len(forget_pairs) if forget_pairs is not None else None,
                 "utility_images": len(utility.images) if utility is not None else None,
                 "utility_classes": len(utility.class_names) if utility is not None else None},
        "seconds": {"load": round(t_load, 4), "total": round(time.perf_counter() - t0, 4)},
    }
    out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails leaves no trace
    report["files"] = {"report": str(out / "eval.json")}
    write_json_atomic(out / "eval.json", report)
    return report


def run_apply(model: str, delta: str, out: str | Path, *, pretrained: str | None = None,
              device: str = "cpu", verify_base: bool = True) -> dict:
    """Apply a saved delta to a model and save the edited model to `out`."""
    out = check_out_dir(out)
    load_delta(delta)  # refuse a bad delta before loading the model
    adapter = load_model(model, pretrained, device)
    changed = apply_delta(adapter.model, delta, verify_base=verify_base)
    save_model(adapter, out)
    return {"model": model, "delta": str(delta), "changed": changed, "out": str(out)}


def run_revert(model: str, delta: str, out: str | Path, *, pretrained: str | None = None,
               device: str = "cpu") -> dict:
    """Undo a revertible delta on a model that carries it and save the restored model to `out`."""
    out = check_out_dir(out)
    check_revertible(delta)  # refuse a delta without its original tensors before loading the model
    adapter = load_model(model, pretrained, device)
    reverted = revert_delta(adapter.model, delta)
    save_model(adapter, out)
    return {"model": model, "delta": str(delta), "reverted": reverted, "out": str(out)}
