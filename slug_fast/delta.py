"""Deltas: the change an unlearning made, as safetensors plus a JSON config (PEFT-like).

A delta directory holds `delta.safetensors` (name -> float32/float64 change, only
the edited tensors) and `delta_config.json` (DeltaConfig: format, version, method,
layers, step, the run's settings, the slug_fast version, and per tensor the
parameter's shape, dtype and SHA-256s of its original bytes and of the result; and
`tensors_file_sha256`, binding the config to its tensor file). A revertible delta also
holds `original.safetensors`, the edited tensors' original bytes: theta1 = cast(theta0 +
delta) rounds away theta0's low-order bits, so only a stored copy gives theta0 back.
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

from .edit import LayerEdit, axpy_reference
from .errors import DeltaError, unknown_name
from .files import check_dir_target, replace_dir, write_atomic, write_json_atomic
from .parameters import named_parameters_of

FORMAT = "slug_fast.delta"
# MAJOR.MINOR of delta_config.json. A newer minor only adds keys a delta applies the same way
# without (read with a warning naming them); a newer major changes how it applies (refused).
# Version 1.0 was written as the integer 1.
VERSION = "1.2"
MAJOR, MINOR = (int(part) for part in VERSION.split("."))
TENSORS_FILE = "delta.safetensors"
CONFIG_FILE = "delta_config.json"
ORIGINALS_FILE = "original.safetensors"  # a revertible delta's original tensors


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (row-major), to recognise the base a delta was made on."""
    data = t.detach().contiguous().cpu().flatten().view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


def applied(original: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """cast(original + delta), rounded as apply_delta rounds it (LayerEdit: float32, float64
    when either is float64), as a new tensor."""
    out = torch.empty_like(original, memory_format=torch.contiguous_format)
    axpy_reference(out, original, delta.to(original.device), 1.0)
    return out


def tensor_spec(t: torch.Tensor, delta: torch.Tensor | None = None) -> dict:
    """What a delta records of the parameter it changes: shape, dtype, SHA-256 of its bytes,
    and with `delta` the SHA-256 of the result, `applied(t, delta)` (what revert_delta checks)."""
    spec = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "base_sha256": tensor_sha256(t)}
    if delta is not None:
        spec["result_sha256"] = tensor_sha256(applied(t.detach(), delta))
    return spec


RESERVED = ("format", "version", "tensors", "tensors_file_sha256", "slug_fast_version", "revertible",
            "originals_file_sha256")
SPEC_KEYS = ("shape", "dtype", "base_sha256", "result_sha256")  # result_sha256 from version 1.2 on
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
    for key in ("base_sha256", "result_sha256"):
        if (key in spec or key == "base_sha256") and not _is_sha256(spec.get(key)):
            return f"has {key} {str(spec.get(key))[:80]!r}; expected 64 lowercase hex digits"
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
    "concepts": (lambda v: isinstance(v, list) and all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                                      for c in v), "a list of tables, each with a name"),
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
    originals_file_sha256: str | None = None  # SHA-256 of original.safetensors (revertible deltas only)
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
    concepts: list[dict] | None = _recorded("concepts")  # unlearn_many: each concept's layers, step, ...
    order: list[str] | None = _recorded("names")  # unlearn_many: the concepts in the order applied
    share_layers: bool | None = _recorded("flag")  # unlearn_many: whether concepts could share a tensor
    revertible: bool | None = _recorded("flag")  # original.safetensors holds the original tensors
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
        for key in ("tensors_file_sha256", "originals_file_sha256"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
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
               specs: Mapping[str, dict], meta: Mapping | None = None,
               originals: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write `delta` (name -> change) to directory `path`, the files all or nothing.

    `specs` holds `tensor_spec` of each original parameter; `meta` goes into the config.
    `originals` (name -> the original tensor, for every delta name) makes the delta
    revertible: their bytes go to original.safetensors, for revert_delta.
    Everything is checked before anything is created. The files are written into a staging
    directory and swapped in, so a reader sees the old set or the new one; if `path`
    holds files of its own, only the delta files are swapped (the config's SHA-256s of
    the tensor files still make load_delta refuse a mixed set).
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
    if originals is not None:
        _check_originals(originals, delta, specs)
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
    files = {TENSORS_FILE: data}
    if originals is not None:
        files[ORIGINALS_FILE] = safetensors_save({n: originals[n].detach().contiguous().cpu() for n in tensors},
                                                 metadata={"format": FORMAT})
        config["revertible"] = True
        config["originals_file_sha256"] = hashlib.sha256(files[ORIGINALS_FILE]).hexdigest()

    def write(staging: Path) -> list[str]:
        for name, content in files.items():
            write_atomic(staging / name, lambda tmp, content=content: Path(tmp).write_bytes(content))
        write_json_atomic(staging / CONFIG_FILE, config)
        return [*files, CONFIG_FILE]

    try:
        # a folder with files of its own keeps them: only ours are swapped (an earlier
        # delta's original.safetensors goes with the old set)
        replace_dir(path, write, owned=lambda name: name == ORIGINALS_FILE)
    except OSError as err:
        raise DeltaError(f"could not write the delta to {path}: {err.strerror or err}") from None
    return path


def _check_originals(originals, delta: Mapping[str, torch.Tensor], specs: Mapping[str, dict]) -> None:
    """Originals must be exactly the tensors the specs describe, one for every delta name."""
    if not isinstance(originals, Mapping) or set(originals) != set(delta):
        raise DeltaError("originals must map every delta name, and only those, to its original tensor; got "
                         f"{sorted(originals)[:3] if isinstance(originals, Mapping) else type(originals).__name__}")
    for name, t in originals.items():
        spec = specs[name]
        if not isinstance(t, torch.Tensor) or list(t.shape) != spec["shape"] or \
                str(t.dtype).removeprefix("torch.") != spec["dtype"]:
            got = f"{list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise DeltaError(f"original of {name!r} is {got}; its spec says {spec['shape']} {spec['dtype']}")
        if tensor_sha256(t) != spec["base_sha256"]:
            raise DeltaError(f"original of {name!r} is not the tensor its spec describes (SHA-256 differs)")


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
    for key in ("tensors_file_sha256", "originals_file_sha256"):
        if key in config and not _is_sha256(config[key]):
            return f"has {key} {str(config[key])[:80]!r}; expected 64 lowercase hex digits"
    if config.get("revertible") is True and "originals_file_sha256" not in config:
        return "is marked revertible but records no originals_file_sha256"
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
        if delta.shape != p.shape:  # load_delta checked it against the config's shape
            raise DeltaError(f"delta for {name!r} has shape {list(delta.shape)}; the model's parameter has shape "
                             f"{list(p.shape)}")
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


def check_revertible(path: str | os.PathLike) -> dict:
    """The config of the delta at `path`, checked; DeltaError unless it was saved revertible."""
    path = Path(path)
    _, config = load_delta(path)
    if config.get("revertible") is not True or not (path / ORIGINALS_FILE).is_file():
        raise DeltaError(f"{path} was saved without its original tensors, so it cannot be reverted: "
                         "theta1 = round(theta0 + delta) drops the low-order bits of theta0, which neither "
                         "theta1 nor the delta holds; save it with save(dir, revertible=True), or reload the "
                         "original model")
    return config


def revert_delta(model, path: str | os.PathLike) -> list[str]:
    """Undo a saved revertible delta in place, bit-exactly; returns the names restored.

    `model` must hold exactly what applying the delta produced (each tensor's SHA-256 is
    checked against the config's result_sha256) and the delta must have been saved with
    revertible=True. Every check comes before any change; on any error the model is untouched.
    """
    path = Path(path)
    config = check_revertible(path)
    data = (path / ORIGINALS_FILE).read_bytes()
    if hashlib.sha256(data).hexdigest() != config["originals_file_sha256"]:
        raise DeltaError(f"{path / ORIGINALS_FILE} is not the file {CONFIG_FILE} was written with (its SHA-256 "
                         "differs: an interrupted or mixed save, or a corrupted file)")
    try:
        originals = safetensors_load(data)
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise DeltaError(f"{path / ORIGINALS_FILE} is not a readable safetensors file ({err})") from None
    if set(originals) != set(config["tensors"]):
        raise DeltaError(f"{path}: {ORIGINALS_FILE} holds {sorted(originals)[:3]}, the config "
                         f"{sorted(config['tensors'])[:3]}")
    named = named_parameters_of(model)
    for name, spec in config["tensors"].items():
        if name not in named:
            raise DeltaError(str(unknown_name("delta tensor's parameter", name, named)))
        if "result_sha256" not in spec:
            raise DeltaError(f"{path} records no result_sha256 for {name!r} (written before version 1.2), so "
                             "it cannot check that the model holds this delta's result")
        if tensor_sha256(named[name]) != spec["result_sha256"]:
            raise DeltaError(f"parameter {name!r} is not what this delta produced (its bytes differ: not applied, "
                             "edited since, or another model); nothing was reverted")
        if tensor_sha256(originals[name]) != spec["base_sha256"]:
            raise DeltaError(f"{path / ORIGINALS_FILE}: the original of {name!r} does not match the config's "
                             "base_sha256")
    with torch.no_grad():
        backup = {n: named[n].detach().clone() for n in originals}
        try:
            for n, t in originals.items():
                named[n].data.copy_(t.to(named[n].device))
        except BaseException:
            for n, t in backup.items():
                named[n].data.copy_(t)
            raise
    return list(originals)
