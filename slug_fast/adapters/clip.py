"""What CLIP-like adapters share: the CLIP losses, batching of (image, caption) pairs, features."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import SlugError
from ..losses import contrastive_loss_from, forget_loss_from
from .base import Adapter


class ClipFamilyAdapter(Adapter):
    """A model with an image tower and a text tower trained contrastively.

    Subclasses say how to run each tower on a batch (`encode_pixels`, `encode_tokens`),
    how batches are laid out (`split`, `join`), and how raw images and texts become
    model inputs (`pixels`, `tokens`).
    """

    # --- per family
    def encode_pixels(self, module, pixels) -> torch.Tensor:
        raise NotImplementedError

    def encode_tokens(self, module, tokens) -> torch.Tensor:
        raise NotImplementedError

    def log_logit_scale(self, module) -> torch.Tensor:
        raise NotImplementedError

    def split(self, batch) -> tuple:
        """(pixels, tokens) of a batch."""
        raise NotImplementedError

    def join(self, pixels, tokens):
        """A batch from pixels and tokens."""
        raise NotImplementedError

    def pixels(self, images) -> torch.Tensor:
        """Model-ready pixel tensor from PIL images (via the model's preprocessing) or tensors."""
        raise NotImplementedError

    def tokens(self, texts: Sequence[str]):
        """Model-ready text input from strings (via the model's tokenizer)."""
        raise NotImplementedError

    # --- shared
    def embed(self, module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised (image, text) embeddings of a batch of matching pairs."""
        pixels, tokens = self.split(batch)
        return (F.normalize(self.encode_pixels(module, pixels), dim=-1),
                F.normalize(self.encode_tokens(module, tokens), dim=-1))

    def forget_loss(self, module, batch) -> torch.Tensor:
        return forget_loss_from(*self.embed(module, batch))

    def retain_loss(self, module, batch) -> torch.Tensor:
        image, text = self.embed(module, batch)
        return contrastive_loss_from(image, text, self.log_logit_scale(module))

    def make_batches(self, pairs: Sequence[tuple], batch_size: int = 32) -> list:
        """Batches of (image, caption) pairs in this model's input format, on its device."""
        if batch_size < 1:
            raise SlugError(f"batch_size must be at least 1, got {batch_size}")
        out = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            out.append(self.join(self.pixels([im for im, _ in chunk]), self.tokens([c for _, c in chunk])))
        return out

    @property
    def device(self) -> torch.device:
        return next(self.target.parameters()).device

    @torch.no_grad()
    def image_features(self, images) -> torch.Tensor:
        """Normalised image embeddings of PIL images or a pixel tensor."""
        pixels = images if isinstance(images, torch.Tensor) else self.pixels(images)
        return F.normalize(self.encode_pixels(self.target, pixels.to(self.device)), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised text embeddings of strings."""
        return self.token_features(self.tokens(list(texts)))

    @torch.no_grad()
    def token_features(self, tokens) -> torch.Tensor:
        """Normalised text embeddings of texts already tokenized (`tokens(texts)`)."""
        return F.normalize(self.encode_tokens(self.target, tokens), dim=-1)


def stack_images(images, preprocess, what: str) -> torch.Tensor:
    """A (N, C, H, W) tensor from a tensor, a list of tensors, or PIL images through `preprocess`."""
    if isinstance(images, torch.Tensor):
        return images
    images = list(images)
    if not images:
        raise SlugError("no images to batch")
    if all(isinstance(im, torch.Tensor) for im in images):
        return torch.stack(images)
    if preprocess is None:
        raise SlugError(f"PIL images need the model's preprocessing: pass {what}")
    return torch.stack([preprocess(im) for im in images])
