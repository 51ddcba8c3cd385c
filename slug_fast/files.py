"""Atomic file output: write to a temporary file beside the target, then rename over it."""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path


def check_dir_target(path: str | os.PathLike, what: str, error: type[Exception] | None = None,
                     writable: bool = False) -> Path:
    """`path` as a Path, refused before anything is created when it is a file or lies under
    one (and, with `writable`, when it could not be written); `what` names it in the error."""
    from .errors import SlugError

    error = error or SlugError
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise error(f"{what} {path} exists and is not a directory; pass a directory (it is created if missing)")
        if writable and not os.access(path, os.W_OK | os.X_OK):
            raise error(f"{what} {path} is not writable; pass a directory you can write to")
        return path
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise error(f"{what} {path} cannot be created: {parent} is a file, not a directory")
            if writable and not os.access(parent, os.W_OK | os.X_OK):
                raise error(f"{what} {path} cannot be created: {parent} is not writable")
            break
    return path


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path), then rename tmp_path to `path`; on failure `path` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    return write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def _load_renameat2():
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, ImportError):  # not Linux/glibc >= 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> None:
    """Swap what `a` and `b` name (files or directories; either may be absent).

    Atomic where the OS can swap two names at once (Linux renameat2); elsewhere two
    renames, with `b` absent for a moment in between. Both must be on one filesystem.
    """
    a, b = Path(a), Path(b)
    a_there, b_there = os.path.lexists(a), os.path.lexists(b)
    if not a_there or not b_there:
        if a_there:
            os.rename(a, b)
        elif b_there:
            os.rename(b, a)
        return
    if _RENAMEAT2 is not None:
        import ctypes

        if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # else: filesystem can't; fall back
            raise OSError(code, os.strerror(code), str(a), None, str(b))
    hold = Path(tempfile.mkdtemp(dir=b.parent, prefix=f".{b.name}.", suffix=".swap"))
    try:
        os.rename(b, hold / "x")
        try:
            os.rename(a, b)
        except BaseException:
            os.rename(hold / "x", b)
            raise
        os.rename(hold / "x", a)
    finally:
        os.rmdir(hold)


def swap_in(dest: str | os.PathLike, staged: str | os.PathLike, names: list[str]) -> None:
    """Make each dest/name what staged/name is (absent included), all or nothing.

    Afterwards staged/name holds the old dest/name; on failure every name already swapped
    is swapped back and the error re-raised. Names are swapped in order: put a manifest last.
    """
    dest, staged = Path(dest), Path(staged)
    done = []
    try:
        for name in names:
            exchange(staged / name, dest / name)
            done.append(name)
    except BaseException:
        for name in reversed(done):
            exchange(staged / name, dest / name)
        raise


def staging_dir(beside: str | os.PathLike, inside: bool = False) -> Path:
    """A new hidden temporary directory inside `beside` (inside=True) or in its parent."""
    beside = Path(beside)
    path = Path(tempfile.mkdtemp(dir=beside if inside else beside.parent, prefix=f".{beside.name}.",
                                 suffix=".staging"))
    os.chmod(path, 0o777 & ~_umask())  # mkdtemp makes 0700; it may become the target itself
    return path


def replace_dir(path: str | os.PathLike, write: Callable[[Path], list[str]],
                owned: Callable[[str], bool] = lambda name: False) -> Path:
    """Make directory `path` hold what `write` stages, all or nothing.

    write(staged) fills a new staging directory and returns the names it wrote, in the order
    they should be swapped in (a manifest last; "sub/file" swaps one file inside a folder).
    Where `path` is absent, or a plain directory whose every entry is written or `owned`
    (ours from an earlier write), the staged folder replaces it in one step, so a reader sees
    the old set or the new one (Linux renameat2; elsewhere two renames, between which `path`
    is briefly absent). Otherwise the names are swapped one by one and other entries stay;
    `owned` entries not written again go with the old set either way. On failure `path` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    whole_possible = _can_stage_beside(path)
    staging = staging_dir(path, inside=not whole_possible)
    try:
        names = write(staging)
        tops = {name.split("/")[0] for name in names}
        if not path.exists():
            exchange(staging, path)
            return path
        entries = os.listdir(path)
        stale = [e for e in entries if e not in tops and owned(e)]
        if whole_possible and all(e in tops or owned(e) for e in entries) and all("/" not in n for n in names):
            os.chmod(staging, stat.S_IMODE(os.stat(path).st_mode))
            exchange(staging, path)
            # a file another program created in `path` since the listing went with the old set: return it
            for e in os.listdir(staging):
                if e not in tops and not owned(e) and not os.path.lexists(path / e):
                    os.rename(staging / e, path / e)
        else:
            swap_in(path, staging, [*stale, *names])
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after a swap: the replaced entries
    return path


def _can_stage_beside(path: Path) -> bool:
    """Whether a staging folder beside `path` could replace it in one rename: the parent is
    writable and on the same filesystem, and `path` is absent or a plain directory."""
    parent = path.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        return False
    if not os.path.lexists(path):
        return True
    return (not path.is_symlink() and path.is_dir() and not os.path.ismount(path)
            and os.stat(path).st_dev == os.stat(parent).st_dev)
