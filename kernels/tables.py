"""Tile and address tables of the Triton kernels, built once per set of tensors and cached.

A kernel launch covers every tile of every tensor of one dtype group: a tile of `tile`
elements gets its tensor (layer) and first element from a table, and each layer its base
addresses and element count from another. Building those tables costs host work (about
860k tiles for a 7B-parameter model) and host-to-device copies; a repeated call on the same
tensors finds them in a small LRU cache and launches at once.

The cache key holds every tensor's data pointer, element count and dtype, so an entry is
used only by tensors at exactly the addresses it holds: a table can never point at memory
of tensors that were freed since (their successors have other keys, or the same addresses
and sizes, which the table then describes correctly). An entry holds no tensor of the
caller, only integers on the device.
"""
from __future__ import annotations

import contextlib
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter

import torch
import triton

CACHE_SIZE = 16
ALIGNMENT = 16  # bytes: the width of a vector load (ld.global.v4.b32)


@dataclass(frozen=True)
class Group:
    """The tiles of the layers of one dtype group, launched together in layer order."""

    dtypes: tuple[torch.dtype, ...]  # the element type of each role's tensors
    tile_layer: torch.Tensor  # int64 [tiles]: the layer of each tile
    tile_start: torch.Tensor  # int64 [tiles]: its first element in the layer
    tile_slot: torch.Tensor  # int64 [tiles]: its row among all tiles of all groups (layer order)
    aligned: bool  # every tensor of the group starts at a multiple of ALIGNMENT bytes

    @property
    def tiles(self) -> int:
        return self.tile_layer.numel()


@dataclass(frozen=True)
class Tables:
    """Everything a launch needs about a list of layers, on their device."""

    device: torch.device
    addresses: torch.Tensor  # int64 [roles, layers]: each role's tensor address per layer
    numels: torch.Tensor  # int64 [layers]
    layer_first_tile: torch.Tensor  # int64 [layers]: the row of its first tile (slots are in layer order)
    layer_tiles: torch.Tensor  # int64 [layers]: how many tiles it has
    groups: tuple[Group, ...]
    tiles: int  # over all groups
    max_layer_tiles: int  # the most tiles of any one layer


_cache: OrderedDict[tuple, Tables] = OrderedDict()
_DTYPE_CODE = {d: i for i, d in enumerate((torch.float32, torch.float64, torch.bfloat16, torch.float16))}
_counts = {"hits": 0, "builds": 0}


def cache_info() -> dict[str, int]:
    """{"hits", "builds", "size"}: how often tables were found and built since the last clear."""
    return {**_counts, "size": len(_cache)}


def clear_cache() -> None:
    _cache.clear()
    _counts.update(hits=0, builds=0)


def device_guard(device: torch.device):
    """Launch on the tensors' GPU, not the current one (raw addresses are only valid there)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def tables_for(roles: list[list[torch.Tensor]], tile: int, check: Callable[[], None]) -> Tables:
    """The tables of layers whose tensors are roles[r][layer] (one list per role, e.g. theta,
    g_f, g_r); layers are grouped by the dtypes of their roles. Cached (see the module).

    Every tensor must be contiguous (checked on every call: a transposed view has its base's
    address, size and dtype); `check` validates the rest (dtypes) before a table is built, so
    a cached key only ever holds valid tensors."""
    device = roles[0][0].device
    flat = [t for role in roles for t in role]
    if not all(map(torch.Tensor.is_contiguous, flat)):
        check()
        raise ValueError("the kernels take contiguous tensors")
    try:
        dtypes = array("b", map(_DTYPE_CODE.__getitem__, map(attrgetter("dtype"), flat)))
    except KeyError:
        check()
        raise ValueError("the kernels take float32, float64, bfloat16 or float16 tensors") from None
    # bytes, not a tuple of thousands of ints: bytes cache their hash and compare with memcmp
    key = (tile, device, array("q", map(torch.Tensor.data_ptr, flat)).tobytes()
           + array("q", map(torch.Tensor.numel, flat)).tobytes() + dtypes.tobytes())
    found = _cache.get(key)
    if found is not None:
        _cache.move_to_end(key)
        _counts["hits"] += 1
        return found
    check()
    built = _build(list(zip(*roles)), len(roles), tile, device)
    _counts["builds"] += 1
    _cache[key] = built
    if len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return built


def _build(layers: list[tuple[torch.Tensor, ...]], n_roles: int, tile: int, device: torch.device) -> Tables:
    numels = [layer[0].numel() for layer in layers]
    counts = torch.tensor([triton.cdiv(n, tile) for n in numels], dtype=torch.int64)
    firsts = torch.cumsum(counts, 0) - counts
    layer_of = torch.repeat_interleave(torch.arange(len(layers), dtype=torch.int64), counts)
    slots = torch.arange(int(counts.sum()), dtype=torch.int64)
    starts = (slots - firsts[layer_of]) * tile
    group_key = [tuple(t.dtype for t in layer) for layer in layers]
    host = [torch.tensor([[t.data_ptr() for t in layer] for layer in layers], dtype=torch.int64).T.reshape(-1),
            torch.tensor(numels, dtype=torch.int64), firsts, counts]
    spec = []  # (dtypes, aligned) per group, in the order their tables follow in `host`
    for dtypes in dict.fromkeys(group_key):
        member = torch.tensor([k == dtypes for k in group_key])
        picked = member[layer_of]
        aligned = all(t.data_ptr() % ALIGNMENT == 0 for layer, k in zip(layers, group_key) if k == dtypes
                      for t in layer)
        host += [layer_of[picked], starts[picked], slots[picked]]
        spec.append((dtypes, aligned))
    # one host-to-device copy for every table, then views into it
    flat = torch.cat(host).to(device)
    sizes = [t.numel() for t in host]
    parts = list(torch.split(flat, sizes))
    addresses = parts[0].view(n_roles, len(layers))
    groups = tuple(Group(dtypes, *parts[4 + 3 * i: 7 + 3 * i], aligned=aligned)
                   for i, (dtypes, aligned) in enumerate(spec))
    return Tables(device, addresses, parts[1], parts[2], parts[3], groups,
                  tiles=int(counts.sum()), max_layer_tiles=int(counts.max()) if len(layers) else 0)
