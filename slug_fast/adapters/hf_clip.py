"""Hugging Face transformers `CLIPModel` (with its processor or tokenizer + image processor)."""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from ..errors import SlugError
from ..pareto import NameRule
from .clip import ClipFamilyAdapter, stack_images

# transformers CLIP naming: a block's q/k/v projections move together, and so do its fc1/fc2
_GROUPS = ((re.compile(r"^(.*\.)(q|k|v)_proj\.weight$"), ("q_proj", "k_proj", "v_proj")),
           (re.compile(r"^(.*\.)(fc1|fc2)\.weight$"), ("fc1", "fc2")))


def _features(out) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output with pooler_output (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HFClipAdapter(ClipFamilyAdapter):
    """transformers CLIPModel: towers vision_model.* (+ visual_projection) and text_model.*
    (+ text_projection); q/k/v_proj and fc1/fc2 move together; batches are dicts with
    pixel_values, input_ids and attention_mask."""

    name = "hf_clip"
    towers: Mapping[str, NameRule] = {
        "vision": lambda n: n.startswith(("vision_model.", "visual_projection.")),
        "text": lambda n: n.startswith(("text_model.", "text_projection.")),
    }

    def __init__(self, model, processor=None, tokenizer=None, image_processor=None):
        super().__init__(model)
        self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        self.image_processor = (image_processor if image_processor is not None
                                else getattr(processor, "image_processor", None))

    def group_of(self, name: str, names: Sequence[str]) -> list[str]:
        """A block's q/k/v_proj weights (or its fc1/fc2 weights) among `names`; else [name]."""
        for pattern, members in _GROUPS:
            hit = pattern.match(name)
            if hit:
                present = set(names)
                return [g for g in (f"{hit.group(1)}{m}.weight" for m in members) if g in present]
        return [name]

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


def load(model: str, pretrained: str | None = None, device: str = "cpu") -> HFClipAdapter:
    """The adapter around the transformers CLIPModel `model` names (a hub id or a directory
    written by save_pretrained), with its processor (or tokenizer and image processor)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, CLIPModel

    clip = CLIPModel.from_pretrained(model).to(device).eval()
    try:
        adapter = HFClipAdapter(clip, processor=AutoProcessor.from_pretrained(model))
    except (OSError, ValueError, TypeError):  # no processor config: tokenizer and image processor apart
        adapter = HFClipAdapter(clip, tokenizer=AutoTokenizer.from_pretrained(model),
                                image_processor=AutoImageProcessor.from_pretrained(model))
    adapter.source = {"library": "transformers", "name": model}
    return adapter
