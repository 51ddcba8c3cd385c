"""open_clip models (`open_clip.create_model_and_transforms`, custom configs included)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..pareto import OPEN_CLIP_TOWERS
from .clip import ClipFamilyAdapter, stack_images


class OpenClipAdapter(ClipFamilyAdapter):
    """open_clip CLIP: towers "vision" (visual.*) and "text" (the rest); batches (images, tokens).

    tokenizer: `open_clip.get_tokenizer(name)` (default: open_clip's SimpleTokenizer at the
    model's context length); preprocess: the eval transform from create_model_and_transforms.
    """

    name = "open_clip"
    towers = OPEN_CLIP_TOWERS

    def __init__(self, model, tokenizer=None, preprocess=None):
        super().__init__(model)
        self.tokenizer = tokenizer
        self.preprocess = preprocess

    def activation_checkpointing(self):
        from .checkpointing import open_clip_checkpointing

        return open_clip_checkpointing(self.target)

    def encode_pixels(self, module, pixels):
        return module.encode_image(pixels)

    def encode_tokens(self, module, tokens):
        return module.encode_text(tokens)

    def log_logit_scale(self, module):
        return module.logit_scale

    def split(self, batch):
        return batch[0], batch[1]

    def join(self, pixels, tokens):
        return pixels, tokens

    def pixels(self, images):
        return stack_images(images, self.preprocess, "preprocess= (from create_model_and_transforms)").to(self.device)

    def tokens(self, texts: Sequence[str]) -> torch.Tensor:
        if self.tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer
            self.tokenizer = SimpleTokenizer(context_length=getattr(self.model, "context_length", 77))
        return self.tokenizer(list(texts)).to(self.device)
