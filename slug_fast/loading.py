"""Load CLIP models by name for the command line, and save edited ones back.

open_clip: an architecture name with a pretrained tag or checkpoint file
("ViT-B-32" + "laion400m_e32"), "hf-hub:org/repo", or a local directory holding
open_clip_config.json + weights ("local-dir" format). Hugging Face: a hub id
("openai/clip-vit-base-patch32") or a directory written by save_pretrained.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .adapters.clip import ClipFamilyAdapter
from .errors import SlugError


def _open_clip_source(model: str, pretrained: str | None) -> str | None:
    """The open_clip model name to load, or None when `model` is not an open_clip model."""
    import open_clip

    path = Path(model)
    if path.is_dir() and (path / "open_clip_config.json").is_file():
        return f"local-dir:{model}"
    if model.startswith(("hf-hub:", "local-dir:")) or pretrained is not None or model in open_clip.list_models():
        return model
    return None


def load_model(model: str, pretrained: str | None = None, device: str = "cpu") -> ClipFamilyAdapter:
    """An adapter around the model `model` names, with its tokenizer and preprocessing."""
    name = _open_clip_source(model, pretrained)
    try:
        if name is not None:
            import open_clip

            from .adapters.open_clip import OpenClipAdapter

            clip, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
            adapter = OpenClipAdapter(clip.eval(), tokenizer=open_clip.get_tokenizer(name), preprocess=preprocess)
            adapter.source = {"library": "open_clip", "name": name, "pretrained": pretrained}
            return adapter
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, CLIPModel

        from .adapters.hf_clip import HFClipAdapter

        clip = CLIPModel.from_pretrained(model).to(device).eval()
        try:
            adapter = HFClipAdapter(clip, processor=AutoProcessor.from_pretrained(model))
        except (OSError, ValueError, TypeError):  # no processor config: tokenizer and image processor apart
            adapter = HFClipAdapter(clip, tokenizer=AutoTokenizer.from_pretrained(model),
                                    image_processor=AutoImageProcessor.from_pretrained(model))
        adapter.source = {"library": "transformers", "name": model}
        return adapter
    except SlugError:
        raise
    except Exception as err:  # the libraries raise many types for a missing or unreadable model
        kind = "open_clip" if name is not None else "Hugging Face"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SlugError(f"could not load {model!r} as a {kind} model ({first}); give an open_clip name "
                        "with --pretrained, a Hugging Face id, or a local model directory") from None


def _open_clip_config(source: dict) -> dict:
    import open_clip

    name = source["name"]
    if name.startswith("local-dir:"):
        return json.loads((Path(name.removeprefix("local-dir:")) / "open_clip_config.json").read_text())
    cfg = open_clip.get_model_config(name.removeprefix("hf-hub:"))
    if cfg is None:
        raise SlugError(f"no open_clip config known for {name!r}; cannot write a loadable copy")
    return {"model_cfg": cfg}


def save_model(adapter: ClipFamilyAdapter, out: str | os.PathLike) -> Path:
    """Write the (edited) model to directory `out`, loadable again by load_model.

    The files are written into a staging directory, then swapped in all or nothing (see
    files.replace_dir); files in `out` that this save does not write are left.
    """
    from safetensors.torch import save_file

    from .files import check_dir_target, replace_dir

    out = check_dir_target(out, "model directory")
    source = getattr(adapter, "source", {"library": adapter.name})
    if source["library"] not in ("open_clip", "transformers"):
        raise SlugError(f"saving {adapter.name} models is not supported by the command line")

    def write(staging: Path) -> list[str]:
        if source["library"] == "open_clip":
            state = {k: v.detach().contiguous().cpu() for k, v in adapter.model.state_dict().items()}
            save_file(state, staging / "open_clip_model.safetensors")
            (staging / "open_clip_config.json").write_text(json.dumps(_open_clip_config(source), indent=2))
        else:
            adapter.model.save_pretrained(staging, safe_serialization=True)
            for part in (adapter.tokenizer, adapter.image_processor):
                if part is not None:
                    part.save_pretrained(staging)
        # weights first, configs last: a config names the weights a loader looks for
        return sorted((p.name for p in staging.iterdir()), key=lambda n: (n.endswith(".json"), n))

    replace_dir(out, write)
    return out
