"""Load models by name for the command line, and save edited CLIP models back.

Each family's loader is registered in slug_fast.adapters.FAMILIES; the command line's are
open_clip (an architecture name with a pretrained tag or checkpoint file, "ViT-B-32" +
"laion400m_e32", "hf-hub:org/repo", or a local directory holding open_clip_config.json +
weights, the "local-dir" format) and Hugging Face CLIP (a hub id such as
"openai/clip-vit-base-patch32", or a directory written by save_pretrained).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import adapters
from .adapters.clip import ClipFamilyAdapter
from .errors import SlugError


def load_model(model: str, pretrained: str | None = None, device: str = "cpu") -> ClipFamilyAdapter:
    """An adapter around the model `model` names, with its tokenizer and preprocessing: the first
    family in FAMILIES whose loader takes the name."""
    for family in adapters.FAMILIES:
        try:
            load = family.loader()
            adapter = None if load is None else load(model, pretrained, device)
        except SlugError:
            raise
        except Exception as err:  # the libraries raise many types for a missing or unreadable model
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SlugError(f"could not load {model!r} as a {family.name} model ({first}); give an open_clip "
                            "name with --pretrained, a Hugging Face id, or a local model directory") from None
        if adapter is not None:
            return adapter
    raise SlugError(f"no model family loads {model!r}; give an open_clip name with --pretrained, a Hugging Face "
                    "id, or a local model directory")


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
