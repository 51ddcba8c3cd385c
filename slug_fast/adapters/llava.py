"""transformers `LlavaForConditionalGeneration`: SLUG edits its CLIP vision tower.

mode="vlm": the VLM's own next-token loss on answers about the concept; the target is the
LLaVA model and only its vision tower is differentiated (language model and projector stay).
mode="clip": CLIP losses on the matching CLIP model (the one the tower was built from);
every edit of its vision tensors is mirrored into the LLaVA tower, so the criterion, the
commit and the delta all act on the LLaVA model.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SlugError
from ..modes import training_state
from ..pareto import DEFAULT_EXCLUDE
from .base import MIRROR_PREFIX, Adapter
from .clip import stack_images
from .hf_clip import HFClipAdapter

MODES = ("vlm", "clip")
# LLaVA-1.5's conversation format; {image} becomes the image token(s), {question} the question
DEFAULT_PROMPT = "USER: {image}\n{question} ASSISTANT:"
IGNORE = -100  # label of tokens the loss skips (transformers' convention)


def _module_prefix(root: nn.Module, module: nn.Module) -> str | None:
    """Parameter-name prefix ("a.b.") of `module` inside `root`, found by identity; None if absent."""
    for name, m in root.named_modules():
        if m is module:
            return f"{name}." if name else ""
    return None


def _attr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def vision_tower_of(model: nn.Module) -> tuple[nn.Module, str]:
    """(vision tower, its parameter-name prefix) of a LLaVA model, whatever the transformers layout.

    Tries the model's accessors (get_vision_tower, vision_tower, model.vision_tower,
    get_encoder(modality="image")), then any submodule named vision_tower; the prefix is
    where that module object sits in named_modules().
    """
    candidates = []
    getter = getattr(model, "get_vision_tower", None)
    if callable(getter):
        try:
            candidates.append(getter())
        except (TypeError, AttributeError):
            pass
    candidates += [_attr_path(model, "vision_tower"), _attr_path(model, "model.vision_tower")]
    encoder = getattr(model, "get_encoder", None)
    if callable(encoder):
        try:
            candidates.append(encoder(modality="image"))
        except (TypeError, ValueError, AttributeError):
            pass
    candidates += [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "vision_tower"]
    base = getattr(model, "base_model", None)
    for tower in candidates:
        if not isinstance(tower, nn.Module) or tower is model or tower is base:
            continue
        prefix = _module_prefix(model, tower)
        if prefix and next(tower.parameters(), None) is not None:
            return tower, prefix
    raise SlugError(f"{type(model).__name__} has no vision tower slug_fast can find (looked for "
                    "get_vision_tower(), vision_tower, model.vision_tower, get_encoder(modality='image') "
                    "and submodules named vision_tower); pass a transformers LlavaForConditionalGeneration")


def _clip_vision_module(clip_model: nn.Module) -> nn.Module:
    if not callable(getattr(clip_model, "get_text_features", None)):
        raise SlugError(f"clip_model ({type(clip_model).__name__}) has no text tower; the CLIP losses need a "
                        "full transformers CLIPModel, not a CLIPVisionModel")
    vision = getattr(clip_model, "vision_model", None)
    if not isinstance(vision, nn.Module):
        raise SlugError(f"clip_model ({type(clip_model).__name__}) has no vision_model; pass the transformers "
                        "CLIPModel the LLaVA vision tower comes from (LLaVA-1.5: openai/clip-vit-large-patch14-336)")
    return vision


def _suffixes(name: str):
    """name, then name without its first component, and so on ("a.b.c", "b.c", "c")."""
    parts = name.split(".")
    return (".".join(parts[i:]) for i in range(len(parts)))


def match_vision_towers(tower_names: Sequence[str], clip_names: Sequence[str]) -> dict[str, str]:
    """LLaVA tower name -> CLIP vision name, both relative to their vision modules.

    Names correspond when one is the other with leading components dropped (transformers 4
    wraps the tower in CLIPVisionModel.vision_model, 5 does not); ambiguous suffixes never match.
    """
    owners: dict[str, list[str]] = {}
    for c in clip_names:
        for s in _suffixes(c):
            owners.setdefault(s, []).append(c)
    clip_set = set(clip_names)
    pairs: dict[str, str] = {}
    for t in tower_names:
        hit = next((s for s in _suffixes(t) if s in clip_set), None)
        if hit is None and len(owners.get(t, ())) == 1:
            hit = owners[t][0]
        if hit is not None:
            pairs[t] = hit
    return pairs


class LlavaAdapter(Adapter):
    """LLaVA: one tower, "vision" (the CLIP vision tower); q/k/v_proj and fc1/fc2 move together;
    the language model's token embeddings and output head are never candidates, even named in params=.

    mode="vlm": batches from `make_qa_batches` ((image, question, answer) triples); the loss
    is the mean next-token cross-entropy on the answer tokens.
    mode="clip": `clip_model` is the transformers CLIPModel whose vision_model equals the
    LLaVA tower (checked tensor by tensor); batches from `make_batches` ((image, caption)
    pairs, through clip_processor / clip_tokenizer); deltas name LLaVA parameters.
    processor (a LlavaProcessor) or tokenizer + image_processor build the LLaVA inputs;
    `prompt` is the conversation template, with {image} and {question}.
    """

    name = "llava"
    group_of = HFClipAdapter.group_of  # the tower is a transformers CLIP vision tower
    exclude = (*DEFAULT_EXCLUDE, "embed_tokens", "lm_head")  # LLaMA's names for them

    def __init__(self, model: nn.Module, *, mode: str = "vlm", clip_model: nn.Module | None = None,
                 processor=None, tokenizer=None, image_processor=None, clip_tokenizer=None,
                 clip_processor=None, prompt: str = DEFAULT_PROMPT):
        if mode not in MODES:
            raise SlugError(f"mode must be one of {MODES}, got {mode!r}")
        if "{image}" not in prompt or "{question}" not in prompt:
            raise SlugError(f"prompt must hold {{image}} and {{question}}, got {prompt!r}; "
                            f"e.g. {DEFAULT_PROMPT!r}")
        super().__init__(model)
        self.mode = mode
        self.prompt = prompt
        self.tower, self.tower_prefix = vision_tower_of(model)
        self.processor = processor
        self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        self.image_processor = (image_processor if image_processor is not None
                                else getattr(processor, "image_processor", None))
        self.tower_names = [self.tower_prefix + n for n, _ in self.tower.named_parameters()]
        self._used: list[str] | None = None
        self.clip_model = None
        self.clip: HFClipAdapter | None = None
        if mode == "vlm":
            if clip_model is not None:
                raise SlugError("clip_model= is used with mode='clip' only; pass mode='clip' to compute "
                                "CLIP losses on it")
            self._to_user: dict[str, str] = {}
            self.towers = {"vision": self.tower_prefix}
        else:
            if clip_model is None:
                raise SlugError("mode='clip' needs clip_model=: the transformers CLIPModel the LLaVA vision "
                                "tower was built from (LLaVA-1.5: openai/clip-vit-large-patch14-336)")
            self.clip_model = clip_model
            clip_images = (clip_processor.image_processor if getattr(clip_processor, "image_processor", None)
                           is not None else self.image_processor)
            self.clip = HFClipAdapter(clip_model, processor=clip_processor, tokenizer=clip_tokenizer,
                                      image_processor=clip_images)
            counterparts = self._check_clip_match(clip_model)
            used = set(self.used_tower_names())
            self._to_user = {c: t for c, t in counterparts.items() if t in used}
            edited = frozenset(self._to_user)
            self.towers = {"vision": lambda n: n in edited}

    # --- what the engine needs
    @property
    def target(self) -> nn.Module:
        return self.clip_model if self.mode == "clip" else self.model

    def param_names(self) -> list[str]:
        return list(self._to_user) if self.mode == "clip" else self.used_tower_names()

    def used_tower_names(self) -> list[str]:
        """LLaVA tower parameters its image features depend on (not the layers after
        vision_feature_layer, nor post_layernorm): the only ones worth editing.

        Found once by autograd reachability from get_image_features on a blank image (all
        tower parameters for a transformers without get_image_features).
        """
        if self._used is None:
            has_features = callable(getattr(self.model, "get_image_features", None))
            self._used = self._reachable_tower_params() if has_features else list(self.tower_names)
        return list(self._used)

    def _reachable_tower_params(self) -> list[str]:
        cfg = self.model.config
        vcfg = cfg.vision_config
        size = vcfg.image_size
        h, w = size if isinstance(size, (tuple, list)) else (size, size)
        first = next(self.tower.parameters())
        blank = torch.zeros(1, getattr(vcfg, "num_channels", 3), h, w, dtype=first.dtype, device=first.device)
        with training_state(self.tower, requires_grad=True) as named, torch.enable_grad():
            out = self.model.get_image_features(
                pixel_values=blank, vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy)
            feats = out if isinstance(out, torch.Tensor) else getattr(out, "pooler_output", out)
            if not isinstance(feats, torch.Tensor):
                feats = torch.cat([f.flatten() for f in feats])
            grads = torch.autograd.grad(feats.float().sum(), list(named.values()), allow_unused=True)
        used = [self.tower_prefix + n for n, g in zip(named, grads) if g is not None]
        if not used:
            raise SlugError("the LLaVA image features depend on no vision tower parameter; "
                            "check config.vision_feature_layer")
        return used

    def delta_name(self, name: str) -> str:
        return self._to_user.get(name, name) if self.mode == "clip" else name

    def edit_params(self, names):
        if self.mode == "vlm":
            return super().edit_params(names)
        clip = dict(self.clip_model.named_parameters())
        llava = dict(self.model.named_parameters())
        out = {}
        for n in names:
            out[self._to_user[n]] = (llava[self._to_user[n]], n)
            out[MIRROR_PREFIX + n] = (clip[n], n)
        return out

    def activation_checkpointing(self):
        """transformers' switch on the target: the CLIP model ("clip"), or the whole LLaVA model
        ("vlm": its vision tower and language model both recompute their layers)."""
        from .checkpointing import hf_checkpointing

        return hf_checkpointing(self.target)

    def forget_loss(self, module, batch) -> torch.Tensor:
        return self.clip.forget_loss(module, batch) if self.mode == "clip" else answer_loss(module, batch)

    def retain_loss(self, module, batch) -> torch.Tensor:
        return self.clip.retain_loss(module, batch) if self.mode == "clip" else answer_loss(module, batch)

    def make_batches(self, items: Sequence[tuple], batch_size: int = 8) -> list:
        """Batches for this mode: (image, caption) pairs for "clip", (image, question, answer) for "vlm"."""
        if self.mode == "clip":
            return self.clip.make_batches(items, batch_size)
        return self.make_qa_batches(items, batch_size)

    # --- mode="clip": the CLIP model must be the tower's source
    def _check_clip_match(self, clip_model) -> dict[str, str]:
        """CLIP parameter name -> LLaVA parameter name, after checking every counterpart is equal."""
        vision = _clip_vision_module(clip_model)
        clip_prefix = _module_prefix(clip_model, vision)
        clip_rel = dict(vision.named_parameters())
        tower_rel = dict(self.tower.named_parameters())
        pairs = match_vision_towers(list(tower_rel), list(clip_rel))
        hint = "; pass the CLIP model the LLaVA vision tower was built from"
        missing = [t for t in tower_rel if t not in pairs]
        if missing:
            raise SlugError(f"LLaVA vision tensor {self.tower_prefix + missing[0]!r} has no counterpart in "
                            f"clip_model's vision_model ({len(missing)} of {len(tower_rel)} unmatched){hint}")
        owner: dict[str, str] = {}
        for t, c in pairs.items():
            if c in owner:
                raise SlugError(f"clip_model vision tensor {clip_prefix + c!r} matches two LLaVA tensors, "
                                f"{self.tower_prefix + owner[c]!r} and {self.tower_prefix + t!r}{hint}")
            owner[c] = t
        extra = [c for c in clip_rel if c not in owner]
        if extra:
            raise SlugError(f"clip_model vision tensor {clip_prefix + extra[0]!r} has no counterpart in the "
                            f"LLaVA vision tower{hint}")

        def where(t, c):
            return f"LLaVA {self.tower_prefix + t!r} vs clip_model {clip_prefix + c!r}"

        for t, c in pairs.items():  # structure first, then values
            a, b = tower_rel[t], clip_rel[c]
            if a.shape != b.shape or a.dtype != b.dtype:
                raise SlugError(f"clip_model's vision tower differs from the LLaVA vision tower: {where(t, c)} "
                                f"have shape/dtype {tuple(a.shape)}/{a.dtype} vs {tuple(b.shape)}/{b.dtype}{hint} "
                                "(same dtype too: convert one with .to(dtype))")
        mapping = {}
        for t, c in pairs.items():
            a, b = tower_rel[t], clip_rel[c]
            if not torch.equal(a.detach(), b.detach().to(a.device)):
                diff = (a.detach().double() - b.detach().to(a.device).double()).abs().max().item()
                raise SlugError(f"clip_model's vision tower differs from the LLaVA vision tower: first differing "
                                f"tensor {where(t, c)} (max abs difference {diff:.3g}){hint}")
            mapping[clip_prefix + c] = self.tower_prefix + t
        order = [n for n, _ in clip_model.named_parameters()]
        return {n: mapping[n] for n in order if n in mapping}

    # --- building LLaVA inputs
    @property
    def device(self) -> torch.device:
        return next(self.tower.parameters()).device

    @property
    def image_token_id(self) -> int:
        cfg = self.model.config
        token = getattr(cfg, "image_token_id", None)
        token = getattr(cfg, "image_token_index", None) if token is None else token
        if token is None:
            raise SlugError("the model's config has no image_token_id / image_token_index")
        return int(token)

    def need_tokenizer(self):
        """The LLaVA tokenizer, or a SlugError saying how to pass one."""
        if self.tokenizer is None:
            raise SlugError("LLaVA inputs need the model's tokenizer: pass processor= (LlavaProcessor) or "
                            "tokenizer= (with the image token added)")
        return self.tokenizer

    def pixels(self, images) -> torch.Tensor:
        """(N, C, H, W) pixel values for the LLaVA tower: tensors as they are, PIL through the image processor."""
        images = images if isinstance(images, torch.Tensor) else list(images)
        if not isinstance(images, torch.Tensor) and not all(isinstance(im, torch.Tensor) for im in images):
            if self.image_processor is None:
                raise SlugError("PIL images need the LLaVA image processor: pass processor= or image_processor=")
            images = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        dtype = next(self.tower.parameters()).dtype
        return stack_images(images, None, "").to(self.device, dtype)

    def image_token_count(self, pixel_values: torch.Tensor) -> int:
        """Image tokens for one image of this size: what LlavaForConditionalGeneration checks
        against its image features (patches, + the CLS token unless the strategy drops it)."""
        h, w = pixel_values.shape[-2:]
        proc = self.processor
        if proc is not None and getattr(proc, "patch_size", None):
            patch, extra = proc.patch_size, getattr(proc, "num_additional_image_tokens", 0)
            strategy = getattr(proc, "vision_feature_select_strategy", None)
        else:
            cfg = self.model.config
            patch = cfg.vision_config.patch_size
            extra = int(any(n.endswith("class_embedding") for n in self.tower_names))
            strategy = getattr(cfg, "vision_feature_select_strategy", "default")
        return (h // patch) * (w // patch) + extra - (1 if strategy == "default" else 0)

    def _image_token_text(self) -> str:
        for owner in (self.processor, self.tokenizer):
            token = getattr(owner, "image_token", None)
            if isinstance(token, str):
                return token
        return self.need_tokenizer().convert_ids_to_tokens(self.image_token_id)

    def prompt_ids(self, question: str, pixel_values: torch.Tensor) -> list[int]:
        """Token ids of the prompt for one image, its image token repeated image_token_count times."""
        tok = self.need_tokenizer()
        text = self.prompt.format(image=self._image_token_text(), question=question)
        ids = list(tok(text)["input_ids"])
        image_id = self.image_token_id
        at = [i for i, t in enumerate(ids) if t == image_id]
        if len(at) != 1:
            raise SlugError(f"the prompt {text!r} tokenizes to {len(at)} image tokens (id {image_id}); expected "
                            "exactly 1: add the image token to the tokenizer as a special token, or pass processor=")
        return ids[:at[0]] + [image_id] * self.image_token_count(pixel_values) + ids[at[0] + 1:]

    def prompt_inputs(self, image, question: str) -> tuple[list[int], torch.Tensor]:
        """(prompt ids, pixel values) for one image; a LlavaProcessor (if given) handles PIL images."""
        if self.processor is not None and not isinstance(image, torch.Tensor):
            text = self.prompt.format(image=self._image_token_text(), question=question)
            enc = self.processor(text=[text], images=[image], return_tensors="pt")
            dtype = next(self.tower.parameters()).dtype
            return enc["input_ids"][0].tolist(), enc["pixel_values"][0].to(self.device, dtype)
        pixels = self.pixels([image])[0]
        return self.prompt_ids(question, pixels), pixels

    def _answer_ids(self, answer: str, eos: bool) -> list[int]:
        tok = self.need_tokenizer()
        ids = list(tok(answer, add_special_tokens=False)["input_ids"])
        if not ids:
            raise SlugError(f"answer {answer!r} tokenizes to no tokens; answers must be non-empty text")
        if eos and tok.eos_token_id is not None:
            ids.append(tok.eos_token_id)
        return ids

    def pad_id(self) -> int:
        """The id that pads batches and generation: the tokenizer's pad token, else its EOS, else 0."""
        tok = self.need_tokenizer()
        for pad in (tok.pad_token_id, tok.eos_token_id):
            if pad is not None:
                return int(pad)
        return 0

    def make_qa_batches(self, items: Sequence[tuple], batch_size: int = 8, *, eos: bool = True) -> list[dict]:
        """Batches of (image, question, answer) triples: dicts of input_ids, attention_mask,
        pixel_values and labels (-100 except on the answer tokens, plus EOS with `eos`).

        Sequences are right-padded, which leaves the causal model's view of each one unchanged.
        """
        if batch_size < 1:
            raise SlugError(f"batch_size must be at least 1, got {batch_size}")
        items = list(items)
        if not items:
            raise SlugError("no (image, question, answer) items to batch")
        for item in items:
            if not isinstance(item, (tuple, list)) or len(item) != 3:
                raise SlugError(f"each item is (image, question, answer); got {type(item).__name__} "
                                f"of length {len(item) if isinstance(item, (tuple, list)) else '?'}")
        pad = self.pad_id()
        out = []
        for start in range(0, len(items), batch_size):
            rows, pixels = [], []
            for image, question, answer in items[start:start + batch_size]:
                prompt, px = self.prompt_inputs(image, question)
                rows.append((prompt, self._answer_ids(answer, eos)))
                pixels.append(px)
            length = max(len(p) + len(a) for p, a in rows)
            ids = torch.full((len(rows), length), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), length), dtype=torch.long)
            labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
            for i, (p, a) in enumerate(rows):
                n = len(p) + len(a)
                ids[i, :n] = torch.tensor(p + a)
                mask[i, :n] = 1
                labels[i, len(p):n] = torch.tensor(a)
            out.append({"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                        "pixel_values": torch.stack(pixels), "labels": labels.to(self.device)})
        return out


def _supports_logits_to_keep(module: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def answer_loss(module: nn.Module, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens (labels != -100) of a batch.

    Only the positions that predict an answer token go through the LM head.
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = labels[:, 1:]
    keep = (targets != IGNORE).any(0).nonzero().flatten()
    if keep.numel() == 0:
        raise SlugError("the batch has no answer tokens (all labels are -100); build it with make_qa_batches")
    if _supports_logits_to_keep(module):
        logits = module(**inputs, logits_to_keep=keep, use_cache=False).logits
    else:
        logits = module(**inputs, use_cache=False).logits[:, keep]
    return F.cross_entropy(logits.float().flatten(0, 1), targets[:, keep].flatten(), ignore_index=IGNORE)
