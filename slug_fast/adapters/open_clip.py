"""open_clip models (`open_clip.create_model_and_transforms`, custom configs included)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..pareto import NameRule
from .clip import ClipFamilyAdapter, stack_images


class OpenClipAdapter(ClipFamilyAdapter):
    """open_clip CLIP: towers "vision" (visual.*) and "text" (the rest); batches (images, tokens).

    tokenizer: `open_clip.get_tokenizer(name)` (default: open_clip's SimpleTokenizer at the
    model's context length); preprocess: the eval transform from create_model_and_transforms.
    """

    name = "open_clip"
    towers: Mapping[str, NameRule] = {"vision": "visual.", "text": lambda n: not n.startswith("visual.")}

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


def _source(model: str, pretrained: str | None) -> str | None:
    """The open_clip model name to load, or None when `model` is not an open_clip model."""
    import open_clip

    path = Path(model)
    if path.is_dir() and (path / "open_clip_config.json").is_file():
        return f"local-dir:{model}"
    if model.startswith(("hf-hub:", "local-dir:")) or pretrained is not None or model in open_clip.list_models():
        return model
    return None


def load(model: str, pretrained: str | None = None, device: str = "cpu") -> OpenClipAdapter | None:
    """The adapter around the open_clip model `model` names (an architecture with a pretrained tag
    or checkpoint file, "hf-hub:org/repo", or a local directory with open_clip_config.json),
    with its tokenizer and preprocessing; None when `model` names no open_clip model."""
    name = _source(model, pretrained)
    if name is None:
        return None
    import open_clip

    clip, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    adapter = OpenClipAdapter(clip.eval(), tokenizer=open_clip.get_tokenizer(name), preprocess=preprocess)
    adapter.source = {"library": "open_clip", "name": name, "pretrained": pretrained}
    return adapter
