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

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import SlugError
from .base import MIRROR_PREFIX, Adapter
from .clip import ClipFamilyAdapter
from .hf_clip import HFClipAdapter

KNOWN_CLIPS = ("SD 1.x: openai/clip-vit-large-patch14; SD 2.x: laion/CLIP-ViT-H-14-laion2B-s32B-b79K; "
               "SDXL text_encoder_2: laion/CLIP-ViT-bigG-14-laion2B-39B-b160k")
# mean and std every CLIP checkpoint SD uses was trained with (OpenAI's, also used by LAION)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
    group = True

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


def _images_tensor(images) -> torch.Tensor:
    """(N, 3, H, W) float32 in [0, 1] from a pipeline's "pt" (N, 3, H, W) or "np" (N, H, W, 3) output."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise SlugError(f"the pipeline returned {type(images).__name__} images; expected a (N, 3, H, W) tensor "
                        "for output_type='pt'")
    return images.detach().to("cpu", torch.float32).clamp(0, 1)


def _input_size(scorer: ClipFamilyAdapter) -> tuple[int, int]:
    model = scorer.target
    vision = getattr(getattr(model, "config", None), "vision_config", None)
    size = getattr(vision, "image_size", None) or getattr(getattr(model, "visual", None), "image_size", None)
    if size is None:
        raise SlugError(f"cannot tell the input size of the {type(model).__name__} scorer; give its adapter "
                        "an image processor (processor= or image_processor=) or preprocess=")
    return (size, size) if isinstance(size, int) else tuple(size)


def _scorer_pixels(scorer: ClipFamilyAdapter, images: torch.Tensor) -> torch.Tensor:
    """Model-ready pixels: through the scorer's own preprocessing (as 8-bit images, like saved
    samples) when it has one, else resized to its input size and normalised with CLIP's mean/std."""
    dtype = next(scorer.target.parameters()).dtype
    if getattr(scorer, "image_processor", None) is not None or getattr(scorer, "preprocess", None) is not None:
        as_uint8 = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return scorer.pixels([Image.fromarray(a) for a in as_uint8]).to(scorer.device, dtype)
    x = F.interpolate(images, size=_input_size(scorer), mode="bicubic", align_corners=False, antialias=True)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((x.clamp(0, 1) - mean) / std).to(scorer.device, dtype)


@torch.no_grad()
def generate_and_score(pipe, prompts: str | Sequence[str], scorer: ClipFamilyAdapter, class_names: Sequence[str],
                       *, num_inference_steps: int, seed: int, height: int | None = None,
                       width: int | None = None, templates: Sequence[str] | None = None,
                       labels: Sequence[str | int] | None = None) -> dict:
    """Generate one image per prompt and classify it zero-shot with `scorer` among `class_names`.

    Prompt i is generated alone with a CPU torch.Generator seeded `seed + i`, so an
    image depends only on its prompt, its seed and the pipeline. Returns prompts,
    images ((N, 3, H, W) in [0, 1]), probabilities ((N, C), softmax of the scorer's
    logit scale times cosine), predicted (class names), predicted_index, and with
    `labels` (class names or indices, one per prompt) correct and top-1 accuracy in percent.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    class_names = list(class_names)
    if not prompts or not class_names:
        raise SlugError(f"generate_and_score needs prompts and class names; got {len(prompts)} prompts and "
                        f"{len(class_names)} class names")
    if not isinstance(scorer, ClipFamilyAdapter):
        raise SlugError(f"scorer must be a CLIP adapter (e.g. slug_fast.adapters.hf_clip.HFClipAdapter(model, "
                        f"processor=...)), got {type(scorer).__name__}")
    targets = None
    if labels is not None:
        labels = list(labels)
        if len(labels) != len(prompts):
            raise SlugError(f"labels has {len(labels)} entries for {len(prompts)} prompts; give one per prompt")
        targets = []
        for lab in labels:
            if isinstance(lab, str):
                if lab not in class_names:
                    raise SlugError(f"label {lab!r} is not a class; classes: {class_names[:5]}")
                targets.append(class_names.index(lab))
            elif isinstance(lab, int) and 0 <= lab < len(class_names):
                targets.append(lab)
            else:
                raise SlugError(f"label {lab!r} must be a class name or an index below {len(class_names)}")

    images = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(seed + i)
        out = pipe(prompt, num_inference_steps=num_inference_steps, generator=generator, height=height,
                   width=width, output_type="pt")
        images.append(_images_tensor(out.images))
    images = torch.cat(images)

    image_emb = scorer.image_features(_scorer_pixels(scorer, images)).float()
    from ..eval.zero_shot import ZeroShotClassifier

    classifier = ZeroShotClassifier(scorer, class_names, templates or ("a photo of a {}.",))
    text_emb = classifier.weights().float().to(image_emb.device)
    scale = scorer.log_logit_scale(scorer.target).detach().float().exp()
    probs = (scale * image_emb @ text_emb.T).softmax(-1).cpu()
    index = probs.argmax(-1).tolist()
    result = {"prompts": prompts, "images": images, "probabilities": probs,
              "predicted": [class_names[j] for j in index], "predicted_index": index,
              "correct": None, "accuracy": None}
    if targets is not None:
        correct = [p == t for p, t in zip(index, targets)]
        result.update(correct=correct, accuracy=100.0 * sum(correct) / len(correct))
    return result
