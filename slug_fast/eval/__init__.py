"""Evaluation of CLIP-family models through an adapter: the paper's metrics.

- zero_shot: identity accuracy of a concept among N names (forget / others), zero-shot
  accuracy on a labelled test set, and a ready criterion for slug_fast.unlearn.
- mia: membership inference (forget vs held-out, by loss and by image-text distance).
- similarity: image-text cosine matrix, before/after numbers, a PNG plot.
- generation: text-to-image pipelines, their images classified zero-shot (Stable Diffusion).
- answers: a LLaVA model's greedy answers and how often they name the expected answer.
- benchmark: the paper's Table 1 columns for one model (what `slug-fast eval` reports).
"""
from .answers import answer_rate, generate_answers, mentions
from .benchmark import table_scores
from .generation import generate_and_score
from .mia import MIAResult, SampleScores, clip_membership_inference, clip_sample_scores, membership_inference
from .similarity import SimilarityWatch, plot_similarity, similarity_change, similarity_figure, similarity_matrix
from .zero_shot import (IDENTITY_TEMPLATES, OBJECT_TEMPLATES, TowerCache, ZeroShotClassifier, concept_accuracy,
                        concept_criterion, encode_images, encode_texts, zero_shot_accuracy)

__all__ = [
    "IDENTITY_TEMPLATES", "MIAResult", "OBJECT_TEMPLATES", "SampleScores", "SimilarityWatch", "TowerCache", "ZeroShotClassifier",
    "answer_rate", "clip_membership_inference", "clip_sample_scores", "concept_accuracy", "concept_criterion",
    "encode_images", "encode_texts", "generate_and_score", "generate_answers", "membership_inference", "mentions",
    "plot_similarity", "similarity_change", "similarity_figure", "similarity_matrix", "table_scores",
    "zero_shot_accuracy",
]
