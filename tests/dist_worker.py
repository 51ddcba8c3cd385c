"""One rank of the distributed tests (tests/test_distributed.py runs it under torchrun).

    torchrun --nproc-per-node N tests/dist_worker.py OUT_DIR

Every scenario runs SLUG on N gloo processes with unequal batch counts per rank, and rank
0 also runs it alone (process_group=False) on all the batches as the oracle. Each rank
saves what it found to OUT_DIR/<scenario>-<rank>.pt (weights_only-loadable).
"""
import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import slug_fast
from slug_fast import digits
from slug_fast.adapters import get_adapter
from slug_fast.data import shard
from slug_fast.demo import demo_task
from slug_fast.distributed import RankFailed, full
from slug_fast.errors import NonFiniteError, SlugError
from slug_fast.eval.zero_shot import concept_criterion


def unequal(batches: list, rank: int, world: int, every_rank: bool = False) -> list:
    """Rank 0 one batch, the last rank the rest, any rank between none (one each with every_rank)."""
    if rank == 0:
        return batches[:1]
    if every_rank:
        return shard(batches[1:], rank - 1, world - 1)
    return batches[1:] if rank == world - 1 else []


def summary(res) -> dict:
    return {"layers": res.layers, "step": res.step, "start": res.candidates[0].search.start if res.candidates else None,
            "trace": [(e.step, e.satisfied) for e in res.trace],
            "candidates": [(c.layers, c.search.start, [(e.step, e.satisfied) for e in c.search.trace])
                           for c in res.candidates],
            "fronts": res.fronts,
            "stats": torch.stack([res.stats.param_norm, res.stats.forget_norm, res.stats.retain_norm,
                                  res.stats.dot]).T.clone(),
            "names": res.stats.names, "delta": {k: v.clone() for k, v in res.delta.items()},
            "ranks": res.ranks, "gradient_peak": res.memory.gradient_peak_bytes}


def edited(model, names) -> dict:
    named = dict(model.named_parameters())
    return {n: full(named[n]).detach().clone() for n in names}


def alone_on_rank0(task, rank: int) -> dict:
    """The oracle: rank 0 unlearns a copy of the model alone on every batch."""
    if rank != 0:
        return {}
    alone = copy.deepcopy(task.model)
    res = slug_fast.unlearn(alone, task.forget, task.retain, task.criterion, process_group=False, progress=False)
    return {"single": summary(res), "single_weights": edited(alone, res.layers)}


def demo(partition: str, rank: int, world: int) -> dict:
    task = demo_task("seven")
    out = alone_on_rank0(task, rank)
    res = slug_fast.unlearn(task.model, unequal(task.forget, rank, world), shard(task.retain), task.criterion,
                            partition=partition, progress=False)
    out["multi"] = summary(res)
    out["multi_weights"] = edited(task.model, res.layers)
    return out


def fsdp(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    task = demo_task("seven")
    out = alone_on_rank0(task, rank)
    model = task.model
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    for block in [*model.visual.transformer.resblocks, *model.transformer.resblocks]:
        fully_shard(block)
    fully_shard(model.visual)
    fully_shard(model.transformer)  # the root's scalar logit_scale stays a plain tensor
    out["sharded"] = [n for n, p in model.named_parameters() if type(p).__name__ == "DTensor"]
    res = slug_fast.unlearn(model, unequal(task.forget, rank, world, every_rank=True), shard(task.retain),
                            task.criterion, progress=False)
    out["multi"] = summary(res)
    out["multi_weights"] = edited(model, res.layers)
    model_now = {n: full(p).detach() for n, p in model.named_parameters()}
    out["unchanged_elsewhere"] = all(torch.equal(model_now[n], original[n]) for n in original if n not in res.layers)
    out["local_shapes"] = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()
                           if type(p).__name__ == "DTensor" and n in res.layers}
    return out


def hf_clip(rank: int, world: int) -> dict:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      vocab_size=40, max_position_embeddings=12),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=16, patch_size=4),
                     projection_dim=16)
    model = CLIPModel(cfg).eval()
    gen = torch.Generator().manual_seed(1)

    def batch(n):
        return torch.randn(n, 3, 16, 16, generator=gen), torch.randint(1, 40, (n, 12), generator=gen)

    forget = [batch(4) for _ in range(5)]
    retain = [batch(6) for _ in range(7)]
    probe = batch(8)

    def loss(m, b):
        return m(input_ids=b[1], pixel_values=b[0], return_loss=True).loss

    with torch.no_grad():
        base = model.get_image_features(pixel_values=probe[0])
        base = getattr(base, "pooler_output", base)

    def criterion(m):
        with torch.no_grad():
            now = m.get_image_features(pixel_values=probe[0])
            now = getattr(now, "pooler_output", now)
        change = float((now - base).norm() / base.norm())
        return change > 0.02, {"change": change}

    out = {}
    kwargs = dict(forget_loss=lambda m, b: -loss(m, b), retain_loss=loss, tower="vision", progress=False)
    if rank == 0:
        alone = copy.deepcopy(model)
        res = slug_fast.unlearn(alone, forget, retain, criterion, process_group=False, **kwargs)
        out["single"] = summary(res)
    res = slug_fast.unlearn(model, unequal(forget, rank, world), unequal(retain, world - 1 - rank, world),
                            criterion, **kwargs)
    out["multi"] = summary(res)
    return out


def failures(rank: int, world: int) -> dict:
    """A criterion that raises on the last rank at its second call, and a NaN loss on one rank's batch."""
    task = demo_task("seven")
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    calls = []

    def criterion(model):
        calls.append(1)
        if rank == world - 1 and len(calls) == 2:
            raise RuntimeError("this rank's evaluation broke")
        return task.criterion(model)

    out = {}
    try:
        slug_fast.unlearn(task.model, shard(task.forget), shard(task.retain), criterion, progress=False)
        out["criterion"] = "no error"
    except (RankFailed, RuntimeError) as err:
        out["criterion"] = f"{type(err).__name__}: {err}"
    out["criterion_restored"] = all(torch.equal(p, before[n]) for n, p in task.model.named_parameters())

    forget = [tuple(t.clone() for t in b) for b in shard(task.forget)]
    if rank == world - 1:
        forget[-1][0].fill_(float("nan"))
    for partition in ("owner", "replicated"):
        try:
            slug_fast.unlearn(task.model, forget, shard(task.retain), task.criterion, partition=partition,
                              progress=False)
            out[partition] = "no error"
        except (RankFailed, NonFiniteError, SlugError) as err:
            out[partition] = f"{type(err).__name__}: {err}"
    out["nan_restored"] = all(torch.equal(p, before[n]) for n, p in task.model.named_parameters())

    # the final edit fails on the last rank only: every rank's weights go back
    step = slug_fast.LayerEdit.step

    def failing_step(edit, value):
        if rank == world - 1 and value == 1.0:
            raise RuntimeError("this rank's edit broke")
        return step(edit, value)

    slug_fast.LayerEdit.step = failing_step
    try:
        slug_fast.unlearn(task.model, shard(task.forget), shard(task.retain), task.criterion, progress=False)
        out["edit"] = "no error"
    except (RankFailed, RuntimeError) as err:
        out["edit"] = f"{type(err).__name__}: {err}"
    finally:
        slug_fast.LayerEdit.step = step
    out["edit_restored"] = all(torch.equal(p, before[n]) for n, p in task.model.named_parameters())
    return out


def split_verdicts(rank: int, world: int) -> dict:
    """A criterion that disagrees with itself across ranks: rank 0's verdicts decide everywhere."""
    task = demo_task("seven")

    def criterion(model):
        forgotten, metrics = task.criterion(model)
        return (forgotten if rank == 0 else not forgotten), metrics

    res = slug_fast.unlearn(task.model, shard(task.forget), shard(task.retain), criterion, progress=False)
    return {"multi": summary(res), "multi_weights": edited(task.model, res.layers)}


def criterion_shards(rank: int, world: int) -> dict:
    """The distributed concept criterion against the same criterion on one process."""
    data = digits.load_digits_data(0)
    model, _ = digits.load_pretrained()
    adapter = get_adapter(model, tokenizer=digits.tokenize)
    names = list(digits.DIGIT_NAMES)
    images, labels = data.test_images[:101], data.test_labels[:101]
    alone = concept_criterion(adapter, images, labels, names, "seven", k=2)
    spread = concept_criterion(adapter, images, labels, names, "seven", k=2, process_group="world")
    return {"alone": alone(model), "spread": spread(model)}


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    out = Path(out_dir)
    scenarios = {"owner": lambda: demo("owner", rank, world), "replicated": lambda: demo("replicated", rank, world),
                 "hf_clip": lambda: hf_clip(rank, world), "fsdp": lambda: fsdp(rank, world),
                 "failures": lambda: failures(rank, world), "criterion": lambda: criterion_shards(rank, world),
                 "verdicts": lambda: split_verdicts(rank, world)}
    for name, run in scenarios.items():
        torch.save(run(), out / f"{name}-{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
