"""The columns of the paper's Table 1 (arXiv 2407.11867) for one model: what `slug-fast eval`
reports, so that a model edited by any tool is scored the way SLUG's runs are."""
from __future__ import annotations

from collections.abc import Sequence

from ..errors import SlugError
from .mia import clip_membership_inference
from .zero_shot import IDENTITY_TEMPLATES, OBJECT_TEMPLATES, check_adapter, concept_criterion, zero_shot_accuracy


def table_scores(adapter, images, labels, class_names: Sequence[str], concept: str, *, k: int = 5,
                 templates: Sequence[str] = IDENTITY_TEMPLATES, utility=None,
                 utility_templates: Sequence[str] = OBJECT_TEMPLATES, forget_pairs: Sequence[tuple] | None = None,
                 held_out_pairs: Sequence[tuple] | None = None, batch_size: int = 64) -> dict:
    """The model's scores (accuracies in percent):

    - `forget_top1`, `forget_top{k}`: zero-shot accuracy of the concept's images among
      `class_names` (the criterion `slug-fast unlearn` drives to 0 at top-k);
    - `others_top1`, `others_top{k}`: the mean per-class accuracy of the other classes' images
      (the paper's other identities); `n_forget`, `n_others`: how many images each side has;
    - `utility_top1`: zero-shot top-1 on `utility` (a slug_fast.data.LabelledImages, e.g. read
      from ImageNet's validation folder) among its classes, or None without it;
    - `mia`, `mia_distance`: membership-inference accuracy telling `forget_pairs` (trained on)
      from `held_out_pairs` (the concept, never trained on) by CLIP loss and by image-text
      distance (50 means the attack cannot tell them apart), or None without both.

    The forget and other accuracies are `concept_criterion`'s metrics on the same images, so
    they equal the after-numbers of the `slug-fast unlearn` report made with the same data.
    """
    adapter = check_adapter(adapter)
    criterion = concept_criterion(adapter, images, labels, class_names, concept, templates, k=k,
                                  batch_size=batch_size)
    _, metrics = criterion(adapter.model)
    scores = {key: metrics[key] for key in metrics if key != "utility"}
    scores["utility_top1"] = None
    if utility is not None:
        scores["utility_top1"] = zero_shot_accuracy(adapter, utility.images, utility.labels, utility.class_names,
                                                    utility_templates, topk=(1,), batch_size=batch_size)["top1"]
    scores["mia"] = scores["mia_distance"] = None
    if (forget_pairs is None) != (held_out_pairs is None):
        raise SlugError("membership inference needs both the forget pairs (trained on) and held-out pairs of the "
                        "concept (never trained on); give both or neither")
    if forget_pairs is not None:
        mia = clip_membership_inference(adapter, forget_pairs, held_out_pairs)
        scores["mia"], scores["mia_distance"] = mia["loss"].mean, mia["distance"].mean
    return scores
