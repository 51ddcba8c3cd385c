"""(image, caption) pairs from the formats users already have, and the forget/retain split.

Every reader returns `Pairs`: a sequence of (PIL image, caption) that
`adapter.make_batches(pairs, batch_size)` turns into batches, plus a record of
the samples it skipped (an image that does not decode never stops the run).

Formats:

- WebDataset shards as img2dataset / LAION write them (`read_webdataset`): tar
  files whose members share a key, e.g. `000000012.jpg` + `000000012.txt`
  (+ `000000012.json`). Image: the first of jpg, jpeg, png, webp; caption: the
  `.txt` (UTF-8), else the `"caption"` field of the `.json`. A shard that is
  truncated or not a tar file is recorded as skipped, keeping what it yielded.
- An image folder (`read_image_folder`): images anywhere under the folder plus a
  captions file, by default `captions.tsv` at its top. One pair per line,
  UTF-8: `relative/path/to/image.jpg<TAB>caption`. The path is relative to the
  folder, the caption is the rest of the line after the first tab; blank lines
  and lines starting with `#` are ignored; a first line that reads exactly
  `filename<TAB>caption` is taken as a header and skipped.
- In-memory lists of (image, caption) (`pairs_from`), images as PIL images or
  (C, H, W) tensors already preprocessed.

Labelled images for zero-shot utility (`read_labelled_folder`): an ImageNet-val-style
folder with one subfolder of images per class. They are decoded when used, not when
read, so a folder of any size never sits in memory.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image

from .errors import SlugError

log = logging.getLogger("slug_fast")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # tried in this order within a sample
CAPTIONS_FILE = "captions.tsv"
_HEADER = ("filename", "caption")
# What Pillow raises on a file that is not an image, is truncated or corrupt, or is too large.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Skipped:
    """A sample (or the rest of a shard) left out: its key or path, why (`kind`), and the detail."""

    key: str
    # "undecodable": the image does not decode; "incomplete": no image or no caption;
    # "missing": a listed file is absent; "unreadable": a shard is not a readable tar (from that point on)
    kind: str
    detail: str = ""


class Pairs(Sequence):
    """(image, caption) pairs, with the samples skipped while reading them.

    Indexing with a slice gives a list, so `adapter.make_batches(pairs, n)` takes a Pairs as is.
    """

    def __init__(self, items: Iterable[tuple], skipped: Iterable[Skipped] = (), source: str = "memory"):
        self.items: list[tuple] = list(items)
        self.skipped: tuple[Skipped, ...] = tuple(skipped)
        self.source = source

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]

    @property
    def captions(self) -> list[str]:
        return [c for _, c in self.items]

    @property
    def undecodable(self) -> int:
        """How many samples were skipped because their image did not decode."""
        return sum(s.kind == "undecodable" for s in self.skipped)

    def skip_counts(self) -> dict[str, int]:
        """kind -> number of skipped samples."""
        return dict(Counter(s.kind for s in self.skipped))

    def __repr__(self) -> str:
        return f"Pairs({len(self)} pairs from {self.source}, skipped {self.skip_counts() or 0})"


def decode_image(data: bytes | os.PathLike | str, mode: str = "RGB") -> Image.Image:
    """A fully loaded PIL image in `mode` from encoded bytes or a file; Pillow's errors pass through."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        im.load()
        return im.convert(mode) if mode else im.copy()


def _finish(items: list, skipped: list[Skipped], source: str, what: str) -> Pairs:
    """A Pairs, or a clear error when nothing usable was read."""
    if not items:
        if not skipped:
            raise SlugError(f"{source} holds no samples; {what}")
        counts = ", ".join(f"{n} {k}" for k, n in Counter(s.kind for s in skipped).items())
        first = "; ".join(f"{s.key}: {s.detail or s.kind}" for s in skipped[:3])
        raise SlugError(f"{source}: no usable pair, everything was skipped ({counts}; e.g. {first}); {what}")
    pairs = Pairs(items, skipped, source)
    if skipped:
        log.warning("%s: skipped %s", source, ", ".join(f"{n} {k}" for k, n in pairs.skip_counts().items()))
    return pairs


# ---------------------------------------------------------------- WebDataset

def _shard_paths(shards) -> list[Path]:
    """Local shard files from a path, a brace pattern ("data/{00000..00009}.tar"), a directory or a list."""
    from webdataset.shardlists import expand_urls

    if isinstance(shards, (str, os.PathLike)):
        text = os.fspath(shards)
        if os.path.isdir(text):
            found = sorted(Path(text).glob("*.tar"))
            if not found:
                raise SlugError(f"directory {text} holds no .tar shards")
            return found
        names = expand_urls(text)
    else:
        names = [os.fspath(s) for s in shards]
    if not names:
        raise SlugError("no shards given; pass a .tar path, a brace pattern like 'shards/{00000..00009}.tar' "
                        "or a list of paths")
    paths, missing = [], []
    for name in names:
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", name) and not re.match(r"^[a-zA-Z]:[\\/]", name):
            if not name.startswith("file:"):
                raise SlugError(f"shard {name!r} is not a local file; slug_fast reads local shards only "
                                "(download them first, e.g. with img2dataset)")
            name = name.removeprefix("file://").removeprefix("file:")
        (paths if os.path.isfile(name) else missing).append(Path(name))
    if missing:
        origin = f" (from {os.fspath(shards)!r})" if isinstance(shards, (str, os.PathLike)) else ""
        raise SlugError(f"{len(missing)} of {len(names)} shards not found{origin}: "
                        f"{', '.join(map(str, missing[:3]))}{' ...' if len(missing) > 3 else ''}")
    return paths


def _caption_of(sample: dict) -> str | None:
    if "txt" in sample:
        return sample["txt"].decode("utf-8", errors="replace").strip()
    if "json" in sample:
        try:
            caption = json.loads(sample["json"]).get("caption")
        except (ValueError, AttributeError):
            return None
        return caption.strip() if isinstance(caption, str) else None
    return None


def read_webdataset(shards, limit: int | None = None, mode: str = "RGB") -> Pairs:
    """(image, caption) pairs from local WebDataset tar shards (img2dataset / LAION layout).

    `shards`: a path, a brace pattern ("laion/{00000..00003}.tar"), a directory
    (its *.tar, sorted) or a list of paths. Samples whose image does not decode,
    or that lack an image or a caption, are skipped and recorded in `.skipped`,
    as is the rest of a shard that is truncated or not a tar file. A missing
    shard, or no pair at all, is an error. `limit` stops after that many pairs.
    """
    import webdataset as wds

    if limit is not None and limit < 1:
        raise SlugError(f"limit must be at least 1 (or None for all), got {limit}")
    paths = _shard_paths(shards)
    items: list[tuple] = []
    skipped: list[Skipped] = []
    for path in paths:
        dataset = wds.WebDataset(str(path), shardshuffle=False, nodesplitter=None, workersplitter=None,
                                 empty_check=False)
        samples = iter(dataset)
        whole = False  # read to its end without an error
        try:
            for sample in samples:
                key = f"{path.name}:{sample['__key__']}"
                ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
                caption = _caption_of(sample)
                if ext is None or not caption:
                    what = "no image (jpg/jpeg/png/webp)" if ext is None else "no caption (txt or json 'caption')"
                    skipped.append(Skipped(key, "incomplete", what))
                    continue
                try:
                    image = decode_image(sample[ext], mode)
                except _DECODE_ERRORS as err:
                    skipped.append(Skipped(f"{key}.{ext}", "undecodable", f"undecodable image ({err})"))
                    continue
                items.append((image, caption))
                if limit is not None and len(items) >= limit:
                    break
            else:
                whole = True
        except (tarfile.TarError, OSError, EOFError, ValueError) as err:
            # a truncated or corrupt shard keeps what was read before the damage; the run goes on
            # webdataset appends its stream objects to args; an error without a message is named by type
            reason = err.args[0] if err.args else type(err).__name__
            skipped.append(Skipped(str(path), "unreadable", f"not a readable WebDataset tar file ({reason})"))
        finally:
            samples.close()  # releases the shard's file when `limit` stops early
        if whole and not _ends_like_a_tar(path):
            skipped.append(Skipped(str(path), "unreadable", "truncated: the shard ends without tar's end-of-archive "
                                   "blocks, so samples after the last one read may be missing"))
        if limit is not None and len(items) >= limit:
            break
    source = str(paths[0]) if len(paths) == 1 else f"{len(paths)} shards ({paths[0]} ...)"
    return _finish(items, skipped, source, "expected img2dataset layout: KEY.jpg (or png/webp) + KEY.txt")


def _ends_like_a_tar(path: Path) -> bool:
    """Whether a tar file ends with the two zero blocks that close an archive: a shard cut
    exactly at a member boundary reads as a shorter valid one without them. A compressed
    shard (.tar.gz, .tar.bz2, .tar.xz) is checked in its uncompressed stream."""
    try:
        with tarfile.open(path) as tar:
            for _ in tar:  # headers only: member data is skipped over
                pass
            tar.fileobj.seek(tar.offset)  # the (decompressed) stream, where tar.offset counts
            return tar.fileobj.read(1024) == bytes(1024)
    except (tarfile.TarError, OSError, EOFError):
        return False


# ---------------------------------------------------------------- image folder

def _caption_lines(path: Path) -> Iterable[tuple[int, str, str]]:
    """(line number, file name, caption) of a captions.tsv file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise SlugError(f"{path} is not UTF-8 text ({err}); save the captions file as UTF-8") from None
    first = True
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "\t" not in line:
            raise SlugError(f"{path}:{number}: expected 'filename<TAB>caption', got {line[:80]!r}")
        name, caption = line.split("\t", 1)
        if first and (name.strip().lower(), caption.strip().lower()) == _HEADER:
            first = False
            continue
        first = False
        yield number, name.strip(), caption.strip()


def read_image_folder(folder: str | os.PathLike, captions: str | os.PathLike = CAPTIONS_FILE,
                      limit: int | None = None, mode: str = "RGB") -> Pairs:
    """(image, caption) pairs from a folder of images and its captions file (see the module doc).

    `captions` is relative to `folder` unless absolute. Listed images that are
    missing or do not decode, and lines with an empty caption, are skipped and
    recorded in `.skipped`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SlugError(f"image folder {folder} is not a directory")
    if limit is not None and limit < 1:
        raise SlugError(f"limit must be at least 1 (or None for all), got {limit}")
    table = folder / captions
    if not table.is_file():
        raise SlugError(f"captions file {table} not found; write one line per image: "
                        f"'relative/path.jpg<TAB>caption' (UTF-8)")
    items: list[tuple] = []
    skipped: list[Skipped] = []
    for number, name, caption in _caption_lines(table):
        file = folder / name
        if not caption:
            skipped.append(Skipped(name, "incomplete", f"empty caption on line {number} of {table.name}"))
            continue
        if not file.is_file():
            skipped.append(Skipped(name, "missing", f"not found (listed on line {number} of {table.name})"))
            continue
        try:
            image = decode_image(file, mode)
        except _DECODE_ERRORS as err:
            skipped.append(Skipped(name, "undecodable", f"undecodable image ({err})"))
            continue
        items.append((image, caption))
        if limit is not None and len(items) >= limit:
            break
    return _finish(items, skipped, str(table), "list images as 'relative/path.jpg<TAB>caption', one per line")


# ---------------------------------------------------------------- labelled folder

class FolderImages(Sequence):
    """Images decoded from their files on access (a slice gives a list of PIL images)."""

    def __init__(self, paths: Sequence[Path], mode: str = "RGB"):
        self.paths, self.mode = list(paths), mode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._load(p) for p in self.paths[index]]
        return self._load(self.paths[index])

    def _load(self, path: Path) -> Image.Image:
        try:
            return decode_image(path, self.mode)
        except _DECODE_ERRORS as err:  # its header read when listed; the rest is damaged
            raise SlugError(f"image {path} does not decode ({err}); replace it or remove it from the folder") from None

    def __repr__(self) -> str:
        return f"FolderImages({len(self)} files)"


class LabelledImages(NamedTuple):
    """Images with the index of their class in `class_names`; `skipped` are files left out."""

    images: FolderImages
    labels: list[int]
    class_names: list[str]
    skipped: list[Skipped]


def read_class_map(path: str | os.PathLike) -> dict[str, str]:
    """folder -> class name from a UTF-8 file of `folder<TAB>name` lines, or `folder name` (split at
    the first space, as in ImageNet's LOC_synset_mapping.txt); blank lines and # comments ignored."""
    path = Path(path)
    if not path.is_file():
        raise SlugError(f"class map {path} not found; write one line per class folder: 'folder<TAB>class name'")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise SlugError(f"class map {path} is not UTF-8 text ({err}); save it as UTF-8") from None
    mapping: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        folder, _, name = line.strip().partition("\t") if "\t" in line else line.strip().partition(" ")
        folder, name = folder.strip(), name.strip()
        if not name:
            raise SlugError(f"{path}:{number}: expected 'folder<TAB>class name', got {line[:80]!r}")
        if mapping.setdefault(folder, name) != name:
            raise SlugError(f"{path}:{number}: folder {folder!r} is mapped twice ({mapping[folder]!r} and {name!r})")
    if not mapping:
        raise SlugError(f"class map {path} maps no folder; write one line per class folder: 'folder<TAB>class name'")
    return mapping


def read_labelled_folder(root: str | os.PathLike,
                         class_names: Mapping[str, str] | Sequence[str] | str | os.PathLike | None = None,
                         per_class: int | None = None, mode: str = "RGB") -> LabelledImages:
    """Images labelled by the subfolder they are in (`root/<class folder>/**/<image>`), classes in
    the folders' sorted order. A class's name is its folder's name, unless `class_names` gives
    them: a mapping folder -> name (e.g. WordNet id -> name), a file of such lines (see
    `read_class_map`), or a sequence of names, one per folder in sorted order (ImageNet's 1000
    names for its 1000 sorted WordNet-id folders). `per_class` keeps the first n images (sorted
    by path) of each class folder. Folders given the same name are one class. Files whose header
    is not an image's are skipped and recorded; a class folder without images stays a class
    (zero-shot chooses among all of them)."""
    root = Path(root)
    if not root.is_dir():
        raise SlugError(f"labelled folder {root} is not a directory")
    if per_class is not None and per_class < 1:
        raise SlugError(f"per_class must be at least 1 (or None for all), got {per_class}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise SlugError(f"labelled folder {root} has no subfolder; put each class's images in a subfolder "
                        "named after it (root/<class>/<image>.jpg), as ImageNet's validation set is laid out")
    if isinstance(class_names, (str, os.PathLike)):
        class_names = read_class_map(class_names)
    if class_names is None:
        names = [f.name for f in folders]
    elif isinstance(class_names, Mapping):
        unmapped = [f.name for f in folders if f.name not in class_names]
        if unmapped:
            raise SlugError(f"the class map names no class for folder(s) {unmapped[:3]} of {root} "
                            f"({len(unmapped)} of {len(folders)}); map every class folder to its name")
        names = [str(class_names[f.name]) for f in folders]
    else:
        names = [str(n) for n in class_names]
        if len(names) != len(folders):
            raise SlugError(f"{len(names)} class names for the {len(folders)} class folders of {root}; give one "
                            "name per folder, in the folders' sorted order")
    unique = list(dict.fromkeys(names))  # folders given one name are one class (ImageNet's two cranes)
    paths: list[Path] = []
    labels: list[int] = []
    skipped: list[Skipped] = []
    for name, folder in zip(names, folders):
        label = unique.index(name)
        files = sorted(f for f in folder.rglob("*") if f.is_file() and not f.name.startswith("."))
        kept = 0
        for file in files:
            if per_class is not None and kept >= per_class:
                break
            try:
                with Image.open(file):  # the header only: the pixels are decoded when used
                    pass
            except _DECODE_ERRORS as err:
                skipped.append(Skipped(str(file.relative_to(root)), "undecodable", f"not an image ({err})"))
                continue
            paths.append(file)
            labels.append(label)
            kept += 1
    if not paths:
        raise SlugError(f"labelled folder {root} holds no image in its {len(folders)} class folder(s)"
                        + (f" ({len(skipped)} files are not images)" if skipped else ""))
    if skipped:
        log.warning("%s: skipped %d files that are not images", root, len(skipped))
    return LabelledImages(FolderImages(paths, mode), labels, unique, skipped)


# ---------------------------------------------------------------- in memory

def pairs_from(items: Iterable) -> Pairs:
    """Pairs from (image, caption) items: PIL images or preprocessed (C, H, W) tensors, str captions."""
    if isinstance(items, Pairs):
        return items
    out = []
    for i, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise SlugError(f"item {i} is a {type(item).__name__}; expected an (image, caption) pair")
        image, caption = item
        if not isinstance(image, Image.Image) and not (isinstance(image, torch.Tensor) and image.ndim == 3):
            what = (f"a tensor of shape {tuple(image.shape)}" if isinstance(image, torch.Tensor)
                    else type(image).__name__)
            raise SlugError(f"item {i}: the image is {what}; expected a PIL image or a (C, H, W) tensor")
        if not isinstance(caption, str) or not caption.strip():
            raise SlugError(f"item {i}: the caption is {caption!r}; expected a non-empty string")
        out.append((image, caption))
    return _finish(out, [], "the pair list", "pass a non-empty list of (image, caption) pairs")


def shard(items: Sequence, rank: int | None = None, world: int | None = None) -> list:
    """This process's share of `items` (pairs, batches, shard paths) for a run on several
    processes: rank r of W gets the r-th of W contiguous blocks, whose sizes differ by at
    most one. rank and world default to torch.distributed's when it is initialised (else
    the whole list). Every item lands on exactly one rank, so sums over ranks cover the set.
    Shard batches rather than pairs when the loss is contrastive (CLIP's): a batch's
    gradient depends on which pairs share it, and sharded batches keep one process's.
    """
    import torch.distributed as dist

    if (rank is None) != (world is None):
        raise SlugError("pass both rank= and world= to shard, or neither (torch.distributed's are used)")
    if rank is None:
        initialised = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if initialised else (0, 1)
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise SlugError(f"shard needs 0 <= rank < world, got rank={rank!r}, world={world!r}")
    items = list(items)
    return items[rank * len(items) // world:(rank + 1) * len(items) // world]


# ---------------------------------------------------------------- concept split

class ConceptSplit(NamedTuple):
    """The pairs that mention a concept (forget) and the rest (retain)."""

    forget: Pairs
    retain: Pairs


def _names(concept: str | Sequence[str]) -> list[str]:
    names = [concept] if isinstance(concept, str) else list(concept)
    if not names or any(not isinstance(n, str) or not n.split() for n in names):
        raise SlugError(f"concept must be a non-empty name or a list of them (aliases), got {concept!r}")
    return names


def concept_pattern(concept: str | Sequence[str]) -> re.Pattern:
    """A case-insensitive regex matching any of the names as whole words.

    "Ann" matches "ann.", "Ann's" and "(ANN)" but not "Annual" or "Joanne";
    "Elon Musk" matches across any whitespace ("Elon  Musk", "elon\\nmusk").
    """
    alternatives = (r"\s+".join(map(re.escape, name.split())) for name in _names(concept))
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


def split_by_concept(pairs: Iterable, concept: str | Sequence[str]) -> ConceptSplit:
    """Split pairs into those whose caption mentions `concept` (a name or aliases) and the rest.

    Matching is whole-word and case-insensitive (see `concept_pattern`). A
    concept that no caption mentions, or that every caption mentions, is an error.
    """
    pairs = pairs_from(pairs)
    names = _names(concept)
    pattern = concept_pattern(names)
    forget, retain = [], []
    for item in pairs:
        (forget if pattern.search(item[1]) else retain).append(item)
    shown = " / ".join(repr(n) for n in names)
    if not forget:
        inside = [c for c in pairs.captions if any(n.lower() in c.lower() for n in names)]
        hint = (f"; it occurs only inside other words, e.g. {inside[0][:80]!r}" if inside
                else f"; e.g. captions: {', '.join(repr(c[:60]) for c in pairs.captions[:3])}")
        raise SlugError(f"no caption among {len(pairs)} pairs from {pairs.source} mentions {shown} as a whole "
                        f"word (any case){hint}; check the spelling or pass aliases as a list")
    if not retain:
        raise SlugError(f"every one of the {len(pairs)} captions mentions {shown}, so the retain set would be "
                        "empty; add pairs without the concept (generic captioned images)")
    return ConceptSplit(Pairs(forget, source=f"{pairs.source} mentioning {shown}"),
                        Pairs(retain, source=f"{pairs.source} not mentioning {shown}"))


def split_by_concepts(pairs: Iterable, concepts: Mapping[str, Sequence[str]] | Sequence[str]
                      ) -> tuple[dict[str, Pairs], Pairs]:
    """Split pairs among several concepts: ({concept: the pairs whose caption mentions it}, the
    pairs mentioning none). `concepts` maps each name to its aliases (or is a list of names).

    Matching is `split_by_concept`'s (whole words, any case, the name or an alias). A caption
    that mentions two concepts is in both forget sets and never retained. A concept that no
    caption mentions, or no pair left to retain, is an error.
    """
    pairs = pairs_from(pairs)
    spelled = {name: [name, *aliases] for name, aliases in concepts.items()} if isinstance(concepts, Mapping) \
        else {name: [name] for name in _names(list(concepts))}
    forgets = {name: split_by_concept(pairs, names).forget for name, names in spelled.items()}
    patterns = [concept_pattern(names) for names in spelled.values()]
    retain = [item for item in pairs if not any(p.search(item[1]) for p in patterns)]
    shown = ", ".join(map(repr, spelled))
    if not retain:
        raise SlugError(f"every one of the {len(pairs)} captions mentions one of {shown}, so the retain set would "
                        "be empty; add pairs without the concepts (generic captioned images)")
    return forgets, Pairs(retain, source=f"{pairs.source} mentioning none of {shown}")


def read_source(source: str | os.PathLike, limit: int | None = None) -> Pairs:
    """Pairs from an image folder (it holds captions.tsv) or from WebDataset shards
    (a .tar, a brace pattern, or a folder of .tar files)."""
    path = Path(source)
    if path.is_dir() and (path / CAPTIONS_FILE).is_file():
        return read_image_folder(path, limit=limit)
    return read_webdataset(str(source), limit=limit)


class Labelled(NamedTuple):
    """Images whose caption names exactly one class, with that class's index."""

    images: list
    labels: list[int]
    ambiguous: int  # captions naming several classes (left out)


def label_by_class(pairs: Iterable, class_names: Sequence[str]) -> Labelled:
    """Label each pair by the one class name its caption mentions (whole words, any case);
    pairs naming no class are left out, pairs naming several are counted and left out."""
    patterns = [concept_pattern(name) for name in class_names]
    images, labels, ambiguous = [], [], 0
    for image, caption in pairs:
        hits = [i for i, p in enumerate(patterns) if p.search(caption)]
        if len(hits) == 1:
            images.append(image)
            labels.append(hits[0])
        elif hits:
            ambiguous += 1
    return Labelled(images, labels, ambiguous)
