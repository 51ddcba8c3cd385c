"""slug_fast: remove a concept from a trained model by editing one layer once along one gradient.

    import slug_fast
    result = slug_fast.unlearn(model, forget_batches, retain_batches, criterion)
    result.save("delta/")                      # safetensors + JSON, only the changed tensors
    slug_fast.apply_delta(other_copy, "delta/")
"""
try:
    import torch  # noqa: F401  (loads libtorch before the C++ extension)

    from . import adapters, data, distributed, eval  # noqa: A004 (the evaluation package, not the builtin)
    from ._backends import availability as backends
    from .config import SlugConfig
    from .delta import DeltaConfig, apply_delta, load_delta, revert_delta, save_delta
    from .edit import LayerEdit
    from .errors import CriterionNotReached, DeltaError, NonFiniteError, SlugError
    from .stores import Gradients, compute_gradients
    from .losses import clip_forget_loss, clip_retain_loss
    from .memory import MemoryReport
    from .pareto import is_eligible, pareto_front
    from .search import Evaluation, SearchResult, search_step, start_step
    from .stats import LayerStats, layer_stats
    from .stores import ChunkedStore, FullStore, GradientStore, OffloadStore
    from .unlearn import Candidate, UnlearnResult, unlearn
    from .many import ManyResult, unlearn_many
except KeyboardInterrupt:  # Ctrl-C while the command line is still starting: one line, not a traceback
    from .cli import exit_if_interrupted_while_starting

    exit_if_interrupted_while_starting()
    raise

__version__ = "0.1.0"

__all__ = [
    "adapters", "data", "distributed", "eval", "Candidate", "ChunkedStore", "CriterionNotReached", "DeltaConfig",
    "DeltaError", "Evaluation", "FullStore", "GradientStore", "Gradients", "LayerEdit", "LayerStats", "MemoryReport",
    "NonFiniteError", "OffloadStore", "SearchResult", "SlugConfig", "SlugError", "UnlearnResult", "apply_delta",
    "backends", "clip_forget_loss", "clip_retain_loss", "compute_gradients", "is_eligible", "layer_stats",
    "load_delta", "ManyResult", "pareto_front", "revert_delta", "save_delta", "search_step", "start_step", "unlearn",
    "unlearn_many",
]
