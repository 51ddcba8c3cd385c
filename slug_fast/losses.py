"""The CLIP losses of shared/SLUG.md, for models with encode_image / encode_text (open_clip).

A batch is a pair (images, text tokens) of matching rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_embeddings(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and text embeddings of a batch (images, tokens)."""
    images, tokens = batch
    image = F.normalize(model.encode_image(images), dim=-1)
    text = F.normalize(model.encode_text(tokens), dim=-1)
    return image, text


def clip_forget_loss(model, batch) -> torch.Tensor:
    """Mean of 1 - cos(image_i, text_i) over matching pairs; SLUG ascends it."""
    image, text = clip_embeddings(model, batch)
    return (1 - (image * text).sum(dim=-1)).mean()


def clip_retain_loss(model, batch) -> torch.Tensor:
    """The symmetric contrastive (InfoNCE) loss of CLIP over the batch."""
    image, text = clip_embeddings(model, batch)
    logits = model.logit_scale.exp() * image @ text.T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
