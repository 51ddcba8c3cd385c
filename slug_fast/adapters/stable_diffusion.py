"""diffusers Stable Diffusion pipelines: SLUG on the pipeline's CLIP text encoder.

The CLIP losses need both towers, so they run on the CLIP model whose text tower the
pipeline's text encoder is (SD 1.x: openai/clip-vit-large-patch14; SD 2.x:
laion/CLIP-ViT-H-14-laion2B-s32B-b79K as a transformers CLIPModel; SDXL text_encoder_2:
laion/CLIP-ViT-bigG-14-laion2B-39B-b160k). Only the text-tower tensors that the
pipeline's encoder also holds are differentiated (SD 2.x's encoder drops the last
layer), and every edit writes the same change into the pipeline's tensor, so the
criterion, the final commit and the delta all act on the pipeline.

SDXL has two text encoders: pass encoder="text_encoder" or "text_encoder_2" with the
matching CLIP model. To edit both, call `unlearn` once per encoder, each with its CLIP
model (with apply=False, then `apply_delta` both): the deltas touch different
components, so they compose in either order.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import SlugError
from .base import MIRROR_PREFIX, Adapter
from .hf_clip import HFClipAdapter

KNOWN_CLIPS = ("SD 1.x: openai/clip-vit-large-patch14; SD 2.x: laion/CLIP-ViT-H-14-laion2B-s32B-b79K; "
               "SDXL text_encoder_2: laion/CLIP-ViT-bigG-14-laion2B-39B-b160k")
def text_tower(model: nn.Module) -> dict[str, tuple[str, nn.Parameter]]:
    """Text-tower parameters as {name relative to the transformer: (name in `model`, tensor)}.

    Works for CLIPModel, CLIPTextModel and CLIPTextModelWithProjection in any
    transformers layout: it descends through `.text_model` instead of trusting
    prefixes, and adds `text_projection` where the model has one.
    """
    core = model
    while isinstance(getattr(core, "text_model", None), nn.Module) and core.text_model is not core:
        core = core.text_model
    full = {id(p): n for n, p in model.named_parameters()}
    out = {rel: (full[id(p)], p) for rel, p in core.named_parameters()}
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, nn.Module):
        out.update({f"text_projection.{rel}": (full[id(p)], p) for rel, p in proj.named_parameters()})
    return out


def _max_mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| beyond the rounding of the coarser dtype (0.0: equal up to rounding)."""
    x = a.detach().to("cpu", torch.float32)
    y = b.detach().to("cpu", torch.float32)
    if torch.equal(x, y):
        return 0.0
    # rounding to a dtype moves a value by at most eps * |value|, or by one subnormal step near zero
    fin = [torch.finfo(t.dtype) for t in (a, b)]
    eps = max(f.eps for f in fin)
    tiny = max(f.smallest_normal * f.eps for f in fin)
    diff = (x - y).abs()
    excess = diff - (eps * torch.maximum(x.abs(), y.abs()) + tiny)
    return float(diff.max()) if bool((excess > 0).any()) else 0.0


def match_text_encoder(clip_model: nn.Module, text_encoder: nn.Module, encoder: str = "text_encoder") -> dict[str, str]:
    """{CLIP parameter name: text-encoder parameter name} for every tensor of `text_encoder`.

    Raises SlugError naming the first tensor of the encoder that the CLIP text tower
    lacks, or holds with another shape or other values (beyond dtype rounding).
    """
    clip_side = text_tower(clip_model)
    pairs: dict[str, str] = {}
    hint = f"pass the CLIP model whose text tower this pipeline's {encoder} is ({KNOWN_CLIPS})"
    for rel, (pname, pp) in text_tower(text_encoder).items():
        if rel not in clip_side:
            raise SlugError(f"{encoder}.{pname} has no counterpart in clip_model's text tower (its "
                            f"{len(clip_side)} tensors include {next(iter(clip_side), 'none')!r}); {hint}")
        cname, cp = clip_side[rel]
        if cp.shape != pp.shape:
            raise SlugError(f"clip_model's text tower does not match the pipeline's {encoder}: first differing "
                            f"tensor {cname!r} has shape {tuple(cp.shape)}, {encoder}.{pname} has "
                            f"{tuple(pp.shape)}; {hint}")
        worst = _max_mismatch(cp, pp)
        if worst:
            raise SlugError(f"clip_model's text tower does not match the pipeline's {encoder}: first differing "
                            f"tensor {cname!r} ({encoder}.{pname}), max |difference| {worst:.3g}; {hint}")
        pairs[cname] = pname
    if not pairs:
        raise SlugError(f"the pipeline's {encoder} has no parameters to edit")
    return {c: pairs[c] for c, _ in clip_model.named_parameters() if c in pairs}


class StableDiffusionAdapter(Adapter):
    """A diffusers pipeline: SLUG's CLIP losses on `clip_model`, edits mirrored into `pipe.<encoder>`.

    clip_model: the transformers CLIPModel whose text tower is `pipe.<encoder>` (checked
    tensor by tensor). tokenizer/processor/image_processor: for the CLIP batches, as in
    HFClipAdapter; the tokenizer defaults to the pipeline's own for that encoder.
    One tower, "text"; HF q/k/v_proj and fc1/fc2 move together.
    """

    name = "stable_diffusion"
    group_of = HFClipAdapter.group_of  # the text encoder is a transformers CLIP text tower

    def __init__(self, pipe, clip_model: nn.Module | None = None, *, encoder: str = "text_encoder",
                 tokenizer=None, processor=None, image_processor=None):
        components = getattr(pipe, "components", None)
        if not isinstance(components, Mapping):
            raise SlugError(f"the stable_diffusion adapter takes a diffusers pipeline, got {type(pipe).__name__}")
        text_encoder = components.get(encoder)
        if not isinstance(text_encoder, nn.Module):
            encoders = [c for c, m in components.items() if "text_encoder" in c and isinstance(m, nn.Module)]
            raise SlugError(f"the pipeline has no text encoder {encoder!r}; pass encoder= one of {encoders}")
        from transformers import CLIPModel

        if not isinstance(clip_model, CLIPModel):
            got = "nothing" if clip_model is None else type(clip_model).__name__
            raise SlugError(f"SLUG on Stable Diffusion needs clip_model=, the transformers CLIPModel whose text "
                            f"tower is pipe.{encoder} ({KNOWN_CLIPS}); got {got}")
        super().__init__(pipe)
        self.encoder = encoder
        self.text_encoder = text_encoder
        self._pipe_names = match_text_encoder(clip_model, text_encoder, encoder)
        if tokenizer is None and processor is None:
            tokenizer = components.get(encoder.replace("text_encoder", "tokenizer"))
        self.clip = HFClipAdapter(clip_model, processor=processor, tokenizer=tokenizer,
                                  image_processor=image_processor)
        self.towers = {"text": lambda n, names=frozenset(self._pipe_names): n in names}

    @property
    def target(self) -> nn.Module:
        return self.clip.target

    def param_names(self) -> list[str]:
        return list(self._pipe_names)

    def activation_checkpointing(self):
        return self.clip.activation_checkpointing()

    def forget_loss(self, module, batch):
        return self.clip.forget_loss(module, batch)

    def retain_loss(self, module, batch):
        return self.clip.retain_loss(module, batch)

    def _pipe_name(self, name: str) -> str:
        if name not in self._pipe_names:
            raise SlugError(f"CLIP parameter {name!r} has no counterpart in the pipeline's {self.encoder} "
                            f"(it holds {len(self._pipe_names)} of the text tower's tensors, e.g. "
                            f"{next(iter(self._pipe_names))!r}); only those can be edited")
        return self._pipe_names[name]

    def delta_name(self, name: str) -> str:
        return f"{self.encoder}.{self._pipe_name(name)}"

    def edit_params(self, names: Sequence[str]) -> dict[str, tuple[nn.Parameter, str]]:
        clip = dict(self.target.named_parameters())
        pipe = dict(self.text_encoder.named_parameters())
        out = {}
        for n in names:
            mirror = pipe[self._pipe_name(n)]
            if mirror is not clip[n]:  # a pipeline built on clip_model.text_model shares the tensor
                out[MIRROR_PREFIX + n] = (clip[n], n)
            out[self.delta_name(n)] = (mirror, n)
        return out

    def make_batches(self, pairs: Sequence[tuple], batch_size: int = 32) -> list:
        """CLIP batches of (image, caption) pairs for the forget or retain set."""
        return self.clip.make_batches(pairs, batch_size)

    def image_features(self, images) -> torch.Tensor:
        return self.clip.image_features(images)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        return self.clip.text_features(texts)
