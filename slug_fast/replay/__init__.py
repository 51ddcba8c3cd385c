"""Cheaper step-search evaluations: replay what an edit cannot change, exactly.

A step search (SLUG, arXiv 2407.11867) evaluates the same criterion many times while
only the edited tensors move. `upstream_replay(model, edit)` is a context manager installed
around one candidate's search (`unlearn(..., cache=True)` does it); while it is active, calls
through `model` cost only what the edit can change. The criterion stays an opaque function:
nothing here assumes what it runs.

1. Upstream replay (stacks.py). For every block stack of the model (the outermost
   nn.ModuleList / nn.Sequential whose children are named 0, 1, ...: open_clip
   `visual.transformer.resblocks` and `transformer.resblocks`, HF
   `vision_model.encoder.layers` and `text_model.encoder.layers`, plain
   Sequentials), the blocks before the first one that holds an edited tensor
   are replayed; so are all blocks of a stack that holds none (the other tower)
   and, as one-block stacks, the modules outside stacks that hold no edited
   tensor (`stems`: patch and token embeddings, final norms, projections).
   The first pass records, per call, the inputs of block 0 and the output of
   the last replayed block (the boundary). A later call whose block-0 inputs are
   bit-identical to a recorded call's (torch.equal, same shape, dtype, device
   and strides; other arguments equal plain values) gets the recorded boundary
   back without running those blocks; anything else runs for real and is
   recorded in its place (the "fallback"). Exact, because nothing in the
   replayed blocks changes: each call checks that their parameters and buffers
   are the same tensors at the same versions (else the records are dropped),
   that no edited tensor is among them, that nothing there is random or
   stateful (dropout, batch-norm statistics in training mode) or watched by a
   hook on a submodule (hooks.py: transformers' idle output-capturing hooks do
   not count, for the transformers versions checked); and the recorded call must
   have run under the same numerics settings (inference mode, autocast,
   TF32/matmul precision, SDPA and MHA fast-path switches, the modules' training
   flags).
   Blocks between block 0 and the boundary return placeholders (placeholders.py:
   torch.Tensor subclasses without storage) that the next block takes as is; any
   other use (a hook on a block, HF `output_hidden_states`, open_clip
   `forward_intermediates`) computes the true value from the recorded block-0
   inputs first, so code that reads inside the replayed blocks sees exact
   values. Such hidden-state tuples may hold placeholders after the call.
2. Linear products (linear.py; `linear=True`, `unlearn(cache="linear")`). For an edited
   nn.Linear weight whose forward is called (open_clip `mlp.c_fc` /
   `mlp.c_proj`, HF `q/k/v_proj`, `out_proj`, `fc1` / `fc2`,
   `visual_projection`; not nn.MultiheadAttention's `out_proj`, whose weight
   MultiheadAttention reads itself without calling out_proj), the output is
   (W0 x + b) + lam * (G x) with both products cached per input verified
   bit-identical to the recorded one, lam the edit's current step (checked
   against the weight once per step), G the direction: one axpy instead of the
   matmul. The same function summed in another order: equal to a plain
   evaluation within float32 rounding, not bit for bit, hence opt-in. Edited
   tensors that are not a called Linear's weight (MultiheadAttention
   in_proj_weight, a conv, a projection Parameter) are recomputed from the
   edited block on, as are all edits when linear is off.

Nothing is replayed or cached while autograd records (grad mode on), so
gradients stay exact; the built-in criteria run under torch.no_grad().

Every stack, stem and Linear keeps its records in a RecordCache (cache.py): records in
call order looked up at a cursor, all caches of one replay sharing one byte budget, and
giving up on a region whose records never match. Memory held, per call of the current
pass (a call = one batch through a stack): references to the block-0 inputs and to the
boundary output, e.g. for an open_clip ViT-B-32 and 64 images of 50 tokens 2 x 9.8 MB,
plus the stem's pixels and patch embedding (38.5 + 9.6 MB, the pixels usually being the
caller's own tensor); never the other blocks' activations. Per call of an edited Linear
(linear=True): its input x and the products W0 x + b and G x in float32 (ViT-B-32
`c_fc`, 64 images: 9.8 + 2 x 39 MB). All of it counts against `max_bytes` (default
2 GiB); calls past it run uncached. Something whose recorded calls never match for
`patience` passes (its input moves with the step: a stack after an edited conv, a final
norm of the edited tower) stops recording and lets its records go. Everything is restored
on exit, exceptions included. Not thread-safe.
"""
from .cache import DEFAULT_MAX_BYTES, ByteBudget, RecordCache
from .context import UpstreamReplay, upstream_replay
from .stacks import find_stacks, find_stems

__all__ = ["DEFAULT_MAX_BYTES", "ByteBudget", "RecordCache", "UpstreamReplay", "find_stacks", "find_stems",
           "upstream_replay"]
