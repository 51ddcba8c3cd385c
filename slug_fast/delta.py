"""Deltas: the change an unlearning made, as safetensors plus a JSON config (PEFT-like).

A delta directory holds `delta.safetensors` (name -> float32/float64 change, only
the edited tensors) and `delta_config.json` (DeltaConfig: format, version, method,
layers, step, the run's settings, the slug_fast version, and per tensor the
parameter's shape, dtype and a SHA-256 of its original bytes; and
`tensors_file_sha256`, binding the config to its tensor file).
Applying sets theta = cast(theta + delta); deltas computed on the same original
model compose.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from .edit import LayerEdit
from .errors import DeltaError, unknown_name
from .files import check_dir_target, replace_dir, write_atomic, write_json_atomic
from .parameters import named_parameters_of

FORMAT = "slug_fast.delta"
# MAJOR.MINOR of delta_config.json. A newer minor only adds keys a delta applies the same way
# without (read with a warning naming them); a newer major changes how it applies (refused).
# Version 1.0 was written as the integer 1.
VERSION = "1.1"
MAJOR, MINOR = (int(part) for part in VERSION.split("."))
TENSORS_FILE = "delta.safetensors"
CONFIG_FILE = "delta_config.json"


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (row-major), to recognise the base a delta was made on."""
    data = t.detach().contiguous().cpu().flatten().view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


def tensor_spec(t: torch.Tensor) -> dict:
    """What a delta records of the parameter it changes: shape, dtype, SHA-256 of its bytes."""
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "base_sha256": tensor_sha256(t)}


RESERVED = ("format", "version", "tensors", "tensors_file_sha256", "slug_fast_version")
SPEC_KEYS = ("shape", "dtype", "base_sha256")
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


def _is_sha256(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _is_shape(v) -> bool:
    return isinstance(v, list) and all(type(x) is int and x >= 0 for x in v)


def _spec_problem(spec) -> str | None:
    """What is wrong with one tensor's spec (see tensor_spec), or None."""
    if not isinstance(spec, dict):
        return f"is a {type(spec).__name__}; expected a table with shape, dtype and base_sha256"
    if not _is_shape(spec.get("shape")):
        return f"has shape {spec.get('shape')!r}; expected a list of non-negative integers"
    if not isinstance(spec.get("dtype"), str) or spec["dtype"] not in _DTYPES:
        return f"has dtype {spec.get('dtype')!r}; expected a torch dtype name such as 'float32'"
    if not _is_sha256(spec.get("base_sha256")):
        return f"has base_sha256 {str(spec.get('base_sha256'))[:80]!r}; expected 64 lowercase hex digits"
    return None


def _tensor_problem(t) -> str | None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return f"is {t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}; expected a floating-point tensor"
    if not bool(torch.isfinite(t).all()):
        return "holds NaN or Inf"
    return None


def _library_version() -> str:
    from . import __version__

    return __version__


_KINDS = {  # what a recorded field holds: (check, what it should be)
    "text": (lambda v: isinstance(v, str), "a string"),
    "names": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of names"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "count": (lambda v: type(v) is int and v >= 1, "a positive integer"),
    "flag": (lambda v: isinstance(v, bool), "true or false"),
    "cache": (lambda v: isinstance(v, bool) or v == "linear", "true, false or 'linear'"),
}


def _recorded(kind: str):
    """A field the config may hold (None: not recorded), type-checked on load."""
    return field(default=None, metadata={"kind": kind})


@dataclass
class DeltaConfig:
    """delta_config.json, typed: `from_dict` checks every entry, `to_dict` gives the JSON object.

    The recorded fields are None where a config lacks them (older deltas, or save_delta with
    other meta); `extra` keeps the keys with no field (a caller's meta, or what a newer minor
    version added), so nothing read is dropped.
    """

    tensors: dict[str, dict]  # name -> tensor_spec of the parameter it changes
    tensors_file_sha256: str | None = None  # SHA-256 of the tensor file (absent in the earliest deltas)
    method: str | None = _recorded("text")
    layers: list[str] | None = _recorded("names")  # the names it changes in the user's object
    target_layers: list[str] | None = _recorded("names")  # the same in the module SLUG differentiated
    tower: str | None = _recorded("text")
    step: float | None = _recorded("number")
    relative_change: float | None = _recorded("number")
    strategy: str | None = _recorded("text")  # from here: the run's settings (slug_fast.SlugConfig)
    group: bool | None = _recorded("flag")
    cache: bool | str | None = _recorded("cache")
    max_evals: int | None = _recorded("count")
    memory_mode: str | None = _recorded("text")  # the gradient store used: full, chunked or offload
    slug_fast_version: str | None = _recorded("text")  # the library that wrote it
    version: str = VERSION
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The JSON object (recorded fields that are None left out)."""
        out = {"format": FORMAT, "version": self.version}
        for f in dataclasses.fields(self):
            if "kind" in f.metadata and getattr(self, f.name) is not None:
                out[f.name] = getattr(self, f.name)
        out.update(self.extra)
        out["tensors"] = {n: dict(spec) for n, spec in self.tensors.items()}
        if self.tensors_file_sha256 is not None:
            out["tensors_file_sha256"] = self.tensors_file_sha256
        return out

    @classmethod
    def from_dict(cls, config, source: str = "the delta config") -> DeltaConfig:
        """`config` (parsed JSON) checked: DeltaError naming `source` and the first problem.

        Another major version is refused; a newer minor version is read, with a warning
        naming the keys this version does not know (kept in `extra`, not used).
        """
        if (problem := _config_problem(config)) is not None:
            raise DeltaError(f"{source} {problem}")
        major, minor = _version_of(config["version"])
        named = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: v for k, v in config.items() if k not in named and k != "format"}
        unknown = list(extra) + sorted({f"tensors[*].{k}" for spec in config["tensors"].values() for k in spec
                                        if k not in SPEC_KEYS})
        if minor > MINOR and unknown:
            warnings.warn(f"{source} is delta format {major}.{minor}, newer than the {VERSION} this slug_fast "
                          f"({_library_version()}) reads; read as {VERSION}, with keys it does not know kept but not "
                          f"used: {', '.join(unknown)}", stacklevel=2)
        fields_ = {k: v for k, v in config.items() if k in named and k != "version"}
        return cls(**fields_, version=f"{major}.{minor}", extra=extra)


def save_delta(path: str | os.PathLike, delta: Mapping[str, torch.Tensor],
               specs: Mapping[str, dict], meta: Mapping | None = None) -> Path:
    """Write `delta` (name -> change) to directory `path`, the pair all or nothing.

    `specs` holds `tensor_spec` of each original parameter; `meta` goes into the config.
    Everything is checked before anything is created. The pair is written into a staging
    directory and swapped in, so a reader sees the old pair or the new one; if `path`
    holds files of its own, only the two delta files are swapped (the config's SHA-256 of
    the tensor file still makes load_delta refuse a mixed pair).
    """
    path = Path(path)
    if not isinstance(delta, Mapping) or not delta:
        raise DeltaError("a delta needs a non-empty mapping of parameter name -> change tensor")
    for name, t in delta.items():
        if not isinstance(name, str) or not name:
            raise DeltaError(f"delta names must be non-empty strings; got {name!r}")
        if (problem := _tensor_problem(t)) is not None:
            raise DeltaError(f"delta for {name!r} {problem}")
        if not isinstance(specs, Mapping) or name not in specs:
            raise DeltaError(f"specs have no entry for delta tensor {name!r}; give tensor_spec(original "
                             "parameter) for every name in the delta")
        if (problem := _spec_problem(specs[name])) is not None:
            raise DeltaError(f"spec of {name!r} {problem}")
        if list(t.shape) != specs[name]["shape"]:
            raise DeltaError(f"delta for {name!r} has shape {list(t.shape)}; its spec says {specs[name]['shape']}")
    meta = dict(meta or {})
    if clash := sorted(set(meta) & set(RESERVED)):
        raise DeltaError(f"meta may not set {clash}; slug_fast writes {list(RESERVED)} itself")
    tensors = {n: d.detach().contiguous().cpu() for n, d in delta.items()}
    config = {"format": FORMAT, "version": VERSION, **meta, "slug_fast_version": _library_version(),
              "tensors": {n: dict(specs[n]) for n in tensors}}
    try:
        json.dumps(config)
    except (TypeError, ValueError) as err:
        raise DeltaError(f"meta must be JSON-serialisable ({err})") from None
    config = DeltaConfig.from_dict(config, "meta").to_dict()  # what load_delta would refuse is refused here
    check_dir_target(path, "delta directory", DeltaError)
    data = safetensors_save(tensors, metadata={"format": FORMAT})
    config["tensors_file_sha256"] = hashlib.sha256(data).hexdigest()

    def write(staging: Path) -> list[str]:
        write_atomic(staging / TENSORS_FILE, lambda tmp: Path(tmp).write_bytes(data))
        write_json_atomic(staging / CONFIG_FILE, config)
        return [TENSORS_FILE, CONFIG_FILE]

    try:
        replace_dir(path, write)  # a folder with files of its own keeps them: only the pair is swapped
    except OSError as err:
        raise DeltaError(f"could not write the delta to {path}: {err.strerror or err}") from None
    return path


def _version_of(value) -> tuple[int, int] | None:
    """(major, minor) of a config's version: "MAJOR.MINOR", or an integer major (1.0 was written 1)."""
    if type(value) is int and value >= 0:
        return value, 0
    if isinstance(value, str) and (hit := re.fullmatch(r"([0-9]{1,9})\.([0-9]{1,9})", value)):
        return int(hit[1]), int(hit[2])
    return None


def _config_problem(config) -> str | None:
    if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(config.get("tensors"), dict):
        return f"is not a {FORMAT} config (format must be {FORMAT!r} with a 'tensors' table)"
    if (version := _version_of(config.get("version"))) is None:
        return f"has version {config.get('version')!r}; expected a delta format version such as {VERSION!r}"
    if version[0] != MAJOR:
        newer = "a newer major version than" if version[0] > MAJOR else "another major version than"
        return (f"has delta format version {version[0]}.{version[1]}, {newer} this slug_fast ({_library_version()}) "
                f"reads: {MAJOR}.x, up to {VERSION}" + ("; upgrade slug_fast to read it" if version[0] > MAJOR else ""))
    if not config["tensors"]:
        return "lists no tensors"
    for name, spec in config["tensors"].items():
        if (problem := _spec_problem(spec)) is not None:
            return f"entry tensors[{name!r}] {problem}"
    if "tensors_file_sha256" in config and not _is_sha256(config["tensors_file_sha256"]):
        return f"has tensors_file_sha256 {str(config['tensors_file_sha256'])[:80]!r}; expected 64 lowercase hex digits"
    for f in dataclasses.fields(DeltaConfig):
        if "kind" in f.metadata and config.get(f.name) is not None:
            check, expected = _KINDS[f.metadata["kind"]]
            if not check(config[f.name]):
                return f"has {f.name} {str(config[f.name])[:80]!r}; expected {expected}"
    return None


def load_delta(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(name -> change, config) from a delta directory, every entry checked; never unpickles.

    A config without `tensors_file_sha256` (written before it was recorded) is still read, and
    so is one of a newer minor version (with a warning; see DeltaConfig.from_dict).
    """
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / TENSORS_FILE).is_file():
        raise DeltaError(f"{path} is not a slug_fast delta: expected {TENSORS_FILE} and {CONFIG_FILE} in it")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise DeltaError(f"{path / CONFIG_FILE} is not valid JSON ({err})") from None
    DeltaConfig.from_dict(config, str(path / CONFIG_FILE))
    data = (path / TENSORS_FILE).read_bytes()  # hashed and parsed from one read
    try:
        tensors = safetensors_load(data)
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise DeltaError(f"{path / TENSORS_FILE} is not a readable safetensors file ({err})") from None
    expected = config.get("tensors_file_sha256")
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise DeltaError(f"{path / TENSORS_FILE} is not the tensor file {CONFIG_FILE} was written with (its "
                         "SHA-256 differs: an interrupted or mixed save, or a corrupted file); save the delta again")
    if set(tensors) != set(config["tensors"]):
        raise DeltaError(f"{path}: the tensors in {TENSORS_FILE} ({sorted(tensors)[:3]}) do not match "
                         f"the config ({sorted(config['tensors'])[:3]})")
    tensors = {n: tensors[n] for n in config["tensors"]}  # the saved order, not the file's
    for name, t in tensors.items():
        if (problem := _tensor_problem(t)) is not None:
            raise DeltaError(f"{path / TENSORS_FILE}: delta for {name!r} {problem}")
        if list(t.shape) != config["tensors"][name]["shape"]:
            raise DeltaError(f"{path}: delta for {name!r} has shape {list(t.shape)}; the config says "
                             f"{config['tensors'][name]['shape']}")
    return tensors, config


def apply_delta(model, path: str | os.PathLike, verify_base: bool = True) -> list[str]:
    """Add a saved delta to `model`'s parameters in place; returns the names changed.

    `model` is an nn.Module or a diffusers pipeline (names "component.parameter").
    Checks every name, shape and dtype (and, with `verify_base`, that each tensor
    still holds the original bytes the delta was computed on) before changing
    anything; on any error the model is untouched.
    """
    tensors, config = load_delta(path)
    named = named_parameters_of(model)
    directions = {}
    for name, delta in tensors.items():
        if name not in named:
            raise DeltaError(str(unknown_name("delta tensor's parameter", name, named)))
        p, spec = named[name], config["tensors"][name]
        if list(p.shape) != list(spec.get("shape", [])) or delta.shape != p.shape:
            raise DeltaError(f"delta for {name!r} has shape {list(delta.shape)} (config {spec.get('shape')}); "
                             f"the model's parameter has shape {list(p.shape)}")
        if str(p.dtype).removeprefix("torch.") != spec.get("dtype"):
            raise DeltaError(f"delta for {name!r} was made for dtype {spec.get('dtype')}; the model's "
                             f"parameter has dtype {p.dtype}; convert the model first")
        if not bool(torch.isfinite(delta).all()):
            raise DeltaError(f"delta for {name!r} holds NaN or Inf")
        if verify_base and tensor_sha256(p) != spec.get("base_sha256"):
            raise DeltaError(f"parameter {name!r} is not the tensor this delta was computed on (its bytes "
                             "differ: another edit or another checkpoint?); pass verify_base=False to "
                             "apply it anyway")
        directions[name] = delta.to(p.device)
    with LayerEdit(named, directions) as edit:
        edit.step(1.0)
        edit.commit()
    return list(directions)
