"""Hugging Face transformers `CLIPModel` (with its processor or tokenizer + image processor)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import SlugError
from ..pareto import HF_CLIP_TOWERS
from .clip import ClipFamilyAdapter, stack_images


def _features(out) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output with pooler_output (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HFClipAdapter(ClipFamilyAdapter):
    """transformers CLIPModel: towers vision_model.* (+ visual_projection) and text_model.*
    (+ text_projection); q/k/v_proj and fc1/fc2 move together; batches are dicts with
    pixel_values, input_ids and attention_mask."""

    name = "hf_clip"
    towers = HF_CLIP_TOWERS
    group = True

    def __init__(self, model, processor=None, tokenizer=None, image_processor=None):
        super().__init__(model)
        self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        self.image_processor = (image_processor if image_processor is not None
                                else getattr(processor, "image_processor", None))

    def activation_checkpointing(self):
        from .checkpointing import hf_checkpointing

        return hf_checkpointing(self.target)

    def encode_pixels(self, module, pixels):
        return _features(module.get_image_features(pixel_values=pixels))

    def encode_tokens(self, module, tokens):
        return _features(module.get_text_features(**tokens))

    def log_logit_scale(self, module):
        return module.logit_scale

    def split(self, batch):
        return batch["pixel_values"], {k: v for k, v in batch.items() if k != "pixel_values"}

    def join(self, pixels, tokens):
        return {"pixel_values": pixels, **tokens}

    def pixels(self, images):
        if isinstance(images, torch.Tensor) or all(isinstance(im, torch.Tensor) for im in images):
            return stack_images(images, None, "").to(self.device)
        if self.image_processor is None:
            raise SlugError("PIL images need the model's image processor: pass processor= or image_processor=")
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)

    def tokens(self, texts: Sequence[str]) -> dict:
        if self.tokenizer is None:
            raise SlugError("texts need the model's tokenizer: pass processor= or tokenizer= "
                            "(e.g. CLIPTokenizer.from_pretrained(...))")
        enc = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        keep = ("input_ids", "attention_mask")
        return {k: enc[k].to(self.device) for k in keep if k in enc}
