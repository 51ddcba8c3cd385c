"""The command-line jobs on real models and data: `slug-fast unlearn`, `apply` and `revert`."""
from __future__ import annotations

import time
from pathlib import Path

from .data import concept_pattern, label_by_class, read_source, shard, split_by_concept
from .delta import apply_delta, check_revertible, load_delta, revert_delta
from .errors import SlugError
from .files import check_dir_target
from .loading import load_model, save_model

SIMILARITY_SAMPLE = 12  # pairs of each set shown in the before/after similarity plot


def _class_list(class_names: str | None, concept: str) -> list[str]:
    """Class names from "a,b,c" or "@file" (one per line); the concept is added if missing."""
    if not class_names:
        raise SlugError("--class-names is required: the concept and other names for zero-shot classification, "
                        "as 'a,b,c' or @file with one name per line")
    if class_names.startswith("@"):
        path = Path(class_names[1:])
        if not path.is_file():
            raise SlugError(f"--class-names file {path} not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise SlugError(f"--class-names file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8 with "
                            "one name per line") from None
        except OSError as err:
            raise SlugError(f"--class-names file {path} cannot be read: {err.strerror or err}") from None
        names = [line.strip() for line in text.splitlines()]
    else:
        names = [n.strip() for n in class_names.split(",")]
    names = list(dict.fromkeys(n for n in names if n))
    if concept not in names:
        names.insert(0, concept)
    if len(names) < 2:
        raise SlugError(f"--class-names needs at least one name besides the concept {concept!r}")
    return names


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
    from .eval.similarity import SimilarityWatch
    from .eval.zero_shot import concept_criterion
    from .report import write_outputs
    from .unlearn import unlearn

    from .memory import parse_budget

    t0 = time.perf_counter()
    out = check_out_dir(out)
    budget = parse_budget(memory_budget)  # refuse a bad budget before loading anything
    names = _class_list(class_names, concept)
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
        sample = list(forget_pairs[:SIMILARITY_SAMPLE]) + list(retain_pairs[:SIMILARITY_SAMPLE])
        similarity = SimilarityWatch(adapter, sample)
        mia_before = clip_membership_inference(adapter, forget_pairs, held_out) if held_out else None

    forget = _batches(adapter, forget_pairs, batch_size, ranks)
    retain = _batches(adapter, retain_pairs, batch_size, ranks)
    result = unlearn(adapter, forget, retain, criterion, strategy=strategy, tower=tower, max_evals=max_evals,
                     memory_budget=budget, checkpointing=checkpointing, progress=progress if writer else False,
                     process_group=None if ranks is None else ranks.group)

    after = judge()
    if not writer:
        return None
    similarity_stats = {**similarity.finish(), "plot": str(out / "similarity.png")}
    report = {
        "concept": concept,
        "model": {"name": model, "pretrained": pretrained, "adapter": adapter.name},
        "layer": result.edited,
        "step": result.step,
        "criterion": f"forget top-{k} zero-shot accuracy among {len(names)} classes is 0",
        "forget": {f"top{j}_{when}": m[f"forget_top{j}"] for j in sorted({1, k})
                   for when, m in (("before", before), ("after", after))},
        "retain": {f"top{j}_{when}": m[f"others_top{j}"] for j in sorted({1, k})
                   for when, m in (("before", before), ("after", after))},
        "similarity": similarity_stats,
        "data": {"forget_pairs": len(forget_pairs), "retain_pairs": len(retain_pairs),
                 "eval_images": len(eval_images), "skipped": {
                     "forget": forget_pairs.skip_counts(), "retain": retain_pairs.skip_counts()}},
        "seconds": {**{k_: round(v, 4) for k_, v in result.seconds.items()}, "load": round(t_load, 4)},
        "unlearn": result.to_dict(),
    }
    if mia_before is not None:
        mia_after = clip_membership_inference(adapter, forget_pairs, held_out)
        report["mia"] = {f"{kind}_{when}": res[kind].mean for kind in ("loss", "distance")
                         for when, res in (("before", mia_before), ("after", mia_after))}
    plot = ("similarity.png", lambda path: similarity.plot(path, f"image-text similarity, forgetting {concept}"))
    report["files"] = write_outputs(out, report, result, {"similarity": plot})
    return report


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
    held_out = []  # images of the concept the model was not unlearned on: MIA's non-members
    if eval_data is not None:
        eval_pairs = read_source(eval_data, limit)
        labelled = label_by_class(eval_pairs, names)
        eval_images, eval_labels = labelled.images, labelled.labels
        mentions = concept_pattern([concept, *aliases])
        held_out = [pair for pair in eval_pairs if mentions.search(pair[1])]
    else:
        others = label_by_class(retain_pairs, names)
        eval_images = [im for im, _ in forget_pairs] + others.images
        eval_labels = [names.index(concept)] * len(forget_pairs) + others.labels
    adapter = load_model(model, pretrained, device)
    return forget_pairs, retain_pairs, eval_images, eval_labels, held_out, adapter


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
