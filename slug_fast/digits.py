"""Tiny deterministic CLIP trained on scikit-learn's 8x8 handwritten digits (built-in demo model)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # imported lazily: the command line starts faster without open_clip and sklearn
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a photo of the digit {}",
    "handwritten {}",
    "a drawing of the number {}",
    "the number {}",
    "a scan of a handwritten {}",
    "the digit {}",
)
CONTEXT_LENGTH = 16
EMBED_DIM = 64
VISION_CFG = dict(image_size=8, patch_size=4, width=64, layers=2, head_width=32, mlp_ratio=2.0, pool_type="avg")
TEXT_CFG = dict(context_length=CONTEXT_LENGTH, vocab_size=49408, width=64, heads=2, layers=2, mlp_ratio=2.0)


@dataclass(frozen=True)
class DigitsData:
    """Normalised train/test split of the sklearn digits as (N, 3, 8, 8) float32 images and int64 labels."""

    train_images: torch.Tensor
    test_images: torch.Tensor
    train_labels: torch.Tensor
    test_labels: torch.Tensor
    pixel_mean: float = 0.0  # of the train split's pixels scaled to [0, 1]; images are (x - mean) / std
    pixel_std: float = 1.0


def load_digits_data(seed: int = 0, test_fraction: float = 0.3) -> DigitsData:
    """Load sklearn digits, split stratified and deterministically, normalise with train statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    x = ds.images.astype(np.float32) / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, ds.target, test_size=test_fraction, random_state=seed, stratify=ds.target
    )
    mean, std = float(x_tr.mean()), float(x_tr.std())

    def prep(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy((a - mean) / std).float()
        return t[:, None].repeat(1, 3, 1, 1).contiguous()

    return DigitsData(prep(x_tr), prep(x_te), torch.as_tensor(y_tr, dtype=torch.int64),
                      torch.as_tensor(y_te, dtype=torch.int64), mean, std)


def open_clip_config(data: DigitsData) -> dict:
    """open_clip "local-dir" config (model_cfg + preprocess_cfg) of the mini-CLIP, so that
    `open_clip.create_model_and_transforms("local-dir:DIR")` rebuilds it with a PIL pipeline."""
    return {"model_cfg": {"embed_dim": EMBED_DIM, "vision_cfg": dict(VISION_CFG), "text_cfg": dict(TEXT_CFG)},
            "preprocess_cfg": {"size": VISION_CFG["image_size"], "mean": [data.pixel_mean] * 3,
                               "std": [data.pixel_std] * 3, "interpolation": "bilinear",
                               "resize_mode": "shortest"}}


def to_pil(image: torch.Tensor, data: DigitsData):
    """A normalised (3, 8, 8) digit image back to an 8-bit grayscale PIL image."""
    from PIL import Image

    pixels = (image[0] * data.pixel_std + data.pixel_mean).clamp(0, 1)
    return Image.fromarray((pixels * 255).round().to(torch.uint8).numpy(), mode="L")


def build_model(seed: int = 0) -> open_clip.model.CLIP:
    """Build the tiny, seeded open_clip CLIP (ViT 8x8 patch-4 image tower, 2-layer text transformer)."""
    import open_clip

    torch.manual_seed(seed)
    return open_clip.model.CLIP(embed_dim=EMBED_DIM, vision_cfg=dict(VISION_CFG), text_cfg=dict(TEXT_CFG))


@lru_cache(maxsize=None)
def tokenizer(context_length: int = CONTEXT_LENGTH) -> SimpleTokenizer:
    """Return open_clip's (offline) BPE SimpleTokenizer for the given context length."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def tokenize(texts: list[str]) -> torch.LongTensor:
    """Tokenize captions to a (len(texts), CONTEXT_LENGTH) LongTensor."""
    return tokenizer(CONTEXT_LENGTH)(list(texts))


def captions_for(labels: torch.Tensor, generator: torch.Generator | None = None) -> list[str]:
    """Caption each label with a randomly drawn template."""
    idx = torch.randint(len(TEMPLATES), (len(labels),), generator=generator)
    return [TEMPLATES[t].format(DIGIT_NAMES[y]) for t, y in zip(idx.tolist(), labels.tolist())]


@torch.no_grad()
def class_text_features(model: open_clip.model.CLIP) -> torch.Tensor:
    """Zero-shot classifier weights (10, embed_dim): renormalised mean of normalised template embeddings."""
    texts = [t.format(name) for name in DIGIT_NAMES for t in TEMPLATES]
    feats = F.normalize(model.encode_text(tokenize(texts)), dim=-1)
    return F.normalize(feats.view(len(DIGIT_NAMES), len(TEMPLATES), -1).mean(1), dim=-1)


@torch.no_grad()
def zero_shot_logits(model: open_clip.model.CLIP, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Scaled cosine-similarity logits (N, 10) of images against class text features."""
    img = F.normalize(model.encode_image(images), dim=-1)
    return model.logit_scale.exp() * img @ text_features.T


@torch.no_grad()
def zero_shot_accuracy(model: open_clip.model.CLIP, images: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Zero-shot top-k accuracy in percent."""
    logits = zero_shot_logits(model, images, class_text_features(model))
    topk = logits.topk(k, dim=-1).indices
    return 100.0 * (topk == labels[:, None]).any(-1).float().mean().item()


def _clip_loss(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets spread uniformly over same-label pairs."""
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def train_digits_clip(
    seed: int = 0,
    epochs: int = 10,
    data: DigitsData | None = None,
    progress: bool = False,
    batch_size: int = 32,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    num_threads: int | None = 1,
) -> open_clip.model.CLIP:
    """Train the tiny CLIP contrastively on train-split image/caption pairs; returns it in eval mode."""
    if num_threads is None:
        return _train(seed, epochs, data, progress, batch_size, lr, weight_decay)
    # Ops this small gain nothing from intra-op threads, and one thread stays fast under CPU contention.
    old = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        return _train(seed, epochs, data, progress, batch_size, lr, weight_decay)
    finally:
        torch.set_num_threads(old)


def _train(seed, epochs, data, progress, batch_size, lr, weight_decay) -> open_clip.model.CLIP:
    """Training loop behind train_digits_clip."""
    data = data if data is not None else load_digits_data()
    model = build_model(seed)
    gen = torch.Generator().manual_seed(seed)
    # Pre-tokenised caption table, row = digit * len(TEMPLATES) + template: training draws from it like captions_for.
    table = tokenize([t.format(n) for n in DIGIT_NAMES for t in TEMPLATES])
    x, y = data.train_images, data.train_labels
    steps_per_epoch = math.ceil(len(y) / batch_size)
    total = max(1, epochs * steps_per_epoch)
    warmup = max(1, total // 10)
    # Train only the token-embedding rows the captions use (the 49408-row table would dominate step time);
    # sorted unique ids keep order, so argmax (EOT) pooling and pad id 0 are unchanged.
    full_emb = model.token_embedding
    vocab, table = table.unique(return_inverse=True)
    model.token_embedding = torch.nn.Embedding.from_pretrained(full_emb.weight[vocab].clone(), freeze=False)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)],
                            lr=lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="digits-clip")
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            labels = y[idx]
            tmpl = torch.randint(len(TEMPLATES), (len(idx),), generator=gen)
            # Encode each distinct caption once, then gather (identical to encoding every caption).
            key = labels * len(TEMPLATES) + tmpl
            uniq, inv = key.unique(return_inverse=True)
            txt = model.encode_text(table[uniq])[inv]
            img = model.encode_image(x[idx])
            loss = _clip_loss(img, txt, labels, model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    if bar is not None:
        bar.close()
    with torch.no_grad():
        full_emb.weight[vocab] = model.token_embedding.weight
    model.token_embedding = full_emb
    return model.eval()


# ------------------------------------------------------------------ shipped weights

PRETRAINED = Path(__file__).parent / "assets" / "digits_clip.safetensors"
_ROWS, _VALUES = "token_embedding.rows", "token_embedding.values"


def save_pretrained(model, path: str | os.PathLike, **metadata) -> Path:
    """Write the mini-CLIP as safetensors, small: the token embedding keeps only the rows
    training changed (the others are build_model(seed)'s initial values, rebuilt on load)."""
    from safetensors.torch import save_file

    from .files import write_atomic

    seed = int(metadata.get("seed", 0))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    init = build_model(seed).state_dict()["token_embedding.weight"]
    emb = state.pop("token_embedding.weight")
    rows = (emb != init).any(dim=1).nonzero().flatten()
    state[_ROWS], state[_VALUES] = rows, emb[rows].contiguous()
    meta = {k: str(v) for k, v in metadata.items()}
    return write_atomic(path, lambda tmp: save_file(state, tmp, metadata=meta))


def load_pretrained(path: str | os.PathLike = PRETRAINED):
    """(model in eval mode, metadata dict) from a file written by save_pretrained."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .errors import SlugError

    path = Path(path)
    if not path.is_file():
        raise SlugError(f"{path} not found; train the mini-CLIP with `python -m slug_fast.digits --out {path}`")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    state = load_file(path)
    model = build_model(int(meta.get("seed", 0)))
    emb = model.state_dict()["token_embedding.weight"].clone()
    emb[state.pop(_ROWS)] = state.pop(_VALUES)
    state["token_embedding.weight"] = emb
    model.load_state_dict(state)
    return model.eval(), meta


def main(argv=None) -> None:
    """Train the mini-CLIP deterministically and write the weights the package ships."""
    import argparse
    import time

    ap = argparse.ArgumentParser(prog="python -m slug_fast.digits", description=main.__doc__)
    ap.add_argument("--out", default=str(PRETRAINED), help=f"output file (default: {PRETRAINED})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    data = load_digits_data(args.seed)
    model = train_digits_clip(seed=args.seed, epochs=args.epochs, data=data)
    seconds = time.perf_counter() - t0
    top1 = zero_shot_accuracy(model, data.test_images, data.test_labels, k=1)
    top5 = zero_shot_accuracy(model, data.test_images, data.test_labels, k=5)
    out = save_pretrained(model, args.out, seed=args.seed, epochs=args.epochs, split_seed=args.seed,
                          test_fraction=0.3, test_top1=round(top1, 4), test_top5=round(top5, 4),
                          train_seconds=round(seconds, 2), torch=torch.__version__)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): held-out zero-shot top-1 {top1:.2f}%, "
          f"top-5 {top5:.2f}%, trained in {seconds:.1f} s")


if __name__ == "__main__":
    main()
