"""Text-to-image evaluation: generate an image per prompt, then classify it zero-shot with a CLIP
model (after a pipeline forgets a concept, its images for that concept should stop showing it)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..adapters.clip import ClipFamilyAdapter
from ..errors import SlugError
from .zero_shot import ZeroShotClassifier

# mean and std every CLIP checkpoint SD uses was trained with (OpenAI's, also used by LAION)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
        return scorer.pixels([Image.fromarray(a) for a in as_uint8]).to(dtype)  # image_features moves them
    x = F.interpolate(images, size=_input_size(scorer), mode="bicubic", antialias=True)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((x.clamp(0, 1) - mean) / std).to(dtype)


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
