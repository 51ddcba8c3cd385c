"""Image-text cosine similarity through a CLIP-family adapter: the matrix, before/after numbers, a plot."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import SlugError
from ..files import write_atomic
from .zero_shot import check_adapter, encode_images, encode_texts


def similarity_matrix(adapter, images, captions: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """(n_images, n_captions) cosine similarities, float32 on the CPU."""
    adapter = check_adapter(adapter)
    image = encode_images(adapter, images, batch_size)
    text = encode_texts(adapter, captions, batch_size)
    return (image @ text.to(image.device).T).cpu()


def _check_pair(before: torch.Tensor, after: torch.Tensor) -> None:
    if before.ndim != 2 or before.shape != after.shape:
        raise SlugError(f"before and after must be similarity matrices of one shape, got "
                        f"{tuple(before.shape)} and {tuple(after.shape)}")


def similarity_change(before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    """Numbers that say how an edit moved the similarities.

    For a square matrix of matching pairs (image i with caption i): the mean
    matched (diagonal) and unmatched (off-diagonal) similarity before and after;
    always the mean and largest absolute change.
    """
    _check_pair(before, after)
    before, after = before.double(), after.double()
    change = (after - before).abs()
    out = {"mean_abs_change": change.mean().item(), "max_abs_change": change.max().item()}
    n = before.shape[0]
    if before.shape[0] == before.shape[1]:
        diagonal = torch.eye(n, dtype=torch.bool)
        for name, m in (("before", before), ("after", after)):
            out[f"matched_{name}"] = m[diagonal].mean().item()
            if n > 1:
                out[f"unmatched_{name}"] = m[~diagonal].mean().item()
    return out


def plot_similarity(path: str | os.PathLike, before: torch.Tensor, after: torch.Tensor | None = None,
                    captions: Sequence[str] | None = None, image_labels: Sequence[str] | None = None,
                    title: str | None = None, dpi: int = 100) -> Path:
    """Heatmaps of a similarity matrix (and, with `after`, the edited one and the change), as a PNG.

    Rows are images, columns captions. The file is written atomically
    (matplotlib's Agg canvas; pyplot and its global state are not used).
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise SlugError(f"plot path {path} must end in .png")
    if not path.parent.is_dir():
        raise SlugError(f"cannot write {path}: the directory {path.parent} does not exist")
    fig = similarity_figure(before, after, captions, image_labels, title)
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def similarity_figure(before: torch.Tensor, after: torch.Tensor | None = None,
                      captions: Sequence[str] | None = None, image_labels: Sequence[str] | None = None,
                      title: str | None = None):
    """The matplotlib Figure plot_similarity draws: one panel ("similarity"), or "before",
    "after" on one colour scale and "after - before" on a symmetric diverging one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    before = before.detach().double().cpu()
    if before.ndim != 2 or before.numel() == 0:
        raise SlugError(f"expected a non-empty (images, captions) matrix, got shape {tuple(before.shape)}")
    panels = [("before" if after is not None else "similarity", before, "viridis", None)]
    if after is not None:
        _check_pair(before, after)
        after = after.detach().double().cpu()
        change = after - before
        bound = max(change.abs().max().item(), 1e-12)
        panels += [("after", after, "viridis", None), ("after - before", change, "RdBu_r", bound)]
    rows, cols = before.shape
    for what, labels, n in (("captions", captions, cols), ("image_labels", image_labels, rows)):
        if labels is not None and len(labels) != n:
            raise SlugError(f"{what} has {len(labels)} entries for a matrix with {n} of them")
    low = min(p[1].min().item() for p in panels[:2])
    high = max(p[1].max().item() for p in panels[:2])
    cell = 0.45
    fig = Figure(figsize=(len(panels) * (2.5 + cols * cell), 1.5 + rows * cell), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (name, m, cmap, bound) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        limits = dict(vmin=-bound, vmax=bound) if bound is not None else dict(vmin=low, vmax=high)
        shown = ax.imshow(m.numpy(), cmap=cmap, aspect="auto", **limits)
        fig.colorbar(shown, ax=ax, shrink=0.8)
        ax.set_title(name)
        ax.set_xlabel("caption")
        ax.set_ylabel("image")
        ax.set_xticks(range(cols), [_short(c) for c in captions] if captions is not None else range(cols),
                      rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(rows), list(image_labels) if image_labels is not None else range(rows), fontsize=7)
        if rows * cols <= 144:
            for r in range(rows):
                for c in range(cols):
                    ax.text(c, r, f"{m[r, c].item():.2f}", ha="center", va="center", fontsize=6)
    if title:
        fig.suptitle(title)
    return fig


def _short(text: str, width: int = 32) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


class SimilarityWatch:
    """The image-text similarity of a fixed sample of pairs, taken before an edit and compared after."""

    def __init__(self, adapter, pairs: Sequence[tuple], batch_size: int = 64):
        self.adapter = adapter
        self.images = [im for im, _ in pairs]
        self.captions = [c for _, c in pairs]
        self.batch_size = batch_size
        self.before = similarity_matrix(adapter, self.images, self.captions, batch_size)
        self.after = None

    def finish(self, path: str | os.PathLike | None = None, title: str | None = None) -> dict:
        """similarity_change of before vs now, and with `path` the before/after plot written there
        (or later, with `plot`)."""
        self.after = similarity_matrix(self.adapter, self.images, self.captions, self.batch_size)
        out = similarity_change(self.before, self.after)
        if path is not None:
            out["plot"] = str(self.plot(path, title))
        return out

    def plot(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """The before/after plot of the last `finish`, written atomically to `path`."""
        if self.after is None:
            raise SlugError("call finish() first: the plot compares before with the model after the edit")
        return plot_similarity(path, self.before, self.after, captions=self.captions, title=title)
