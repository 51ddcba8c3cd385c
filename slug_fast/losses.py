"""The CLIP losses of SLUG (arXiv 2407.11867), on L2-normalised image and text embeddings.

`clip_forget_loss(model, batch)` and `clip_retain_loss(model, batch)` take open_clip-style
models (encode_image / encode_text / logit_scale) and (images, tokens) batches; adapters
reuse the embedding-level functions for other model families.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def forget_loss_from(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(image_i, text_i) over matching pairs (normalised rows); SLUG ascends it."""
    return (1 - (image * text).sum(dim=-1)).mean()


def contrastive_loss_from(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over a batch of normalised matching rows; logit_scale is log-scale."""
    logits = logit_scale.exp() * image @ text.T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def clip_embeddings(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and text embeddings of an open_clip batch (images, tokens)."""
    images, tokens = batch
    image = F.normalize(model.encode_image(images), dim=-1)
    text = F.normalize(model.encode_text(tokens), dim=-1)
    return image, text


def clip_forget_loss(model, batch) -> torch.Tensor:
    """Forget loss of an open_clip model on (images, tokens)."""
    return forget_loss_from(*clip_embeddings(model, batch))


def clip_retain_loss(model, batch) -> torch.Tensor:
    """Retain (contrastive) loss of an open_clip model on (images, tokens)."""
    return contrastive_loss_from(*clip_embeddings(model, batch), model.logit_scale)
