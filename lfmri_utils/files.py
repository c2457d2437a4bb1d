"""Atomic writing and path checks, with one-line, file-naming errors (standard library only). Every lfmri file
output goes through the helpers here (NIfTI volumes through `datamodules.io.save_nifti_atomic`, which uses
`atomic_path`).

Atomic writes (`atomic_path` for a file, `atomic_dir` for a folder of files): the data go to a temporary
`.NAME.tmp-HOST-PID` beside the destination, are flushed to disk, then replace it with one `os.replace`;
on any error the temporary is removed, so nothing is left behind and the old file stays. A replaced file keeps
its permission bits (a new one gets the usual `0o666` less the umask); a destination that is a symbolic link
is written through: its target is replaced, the link stays (checkpoints are the exception, see `atomic_path`).
A process killed mid-write leaves its `.NAME.tmp-HOST-PID` behind, visible to `ls -a`; the next write of NAME
on the same host removes the temporaries of processes that no longer run (`remove_stale`).

Input and output checks (`check_input_file`, `check_output_file`, `check_output_dir`): commands call them
before any computing, so a missing input, a bad suffix, a folder where a file is wanted or an unwritable
location is reported at once, in one line.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import stat
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from lfmri_utils.errors import InputError

__all__ = ["atomic_path", "atomic_dir", "remove_stale", "check_input_file", "check_output_file",
           "check_output_dir", "check_writable_folder"]

_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


def _temp_suffix(path: Path) -> str:
    """The ending a temporary of `path` keeps: its suffix, with the one before it when the last is a
    compression suffix (`.nii.gz`, `.json.gz`), so writers that go by the ending keep working."""
    suffixes = path.suffixes
    if len(suffixes) >= 2 and suffixes[-1].lower() in _COMPRESSED:
        return "".join(suffixes[-2:])
    return path.suffix


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", socket.gethostname().split(".")[0]) or "localhost"


_CLAIMED: set[str] = set()
_CLAIM_LOCK = threading.Lock()


def _claim(path: Path, kind: str, suffix: str = "") -> Path:
    """The temporary name `.NAME.<kind>-HOST-PID<suffix>` beside `path` (`_N` after the PID when this process
    already uses that name); release it with `_release`."""
    with _CLAIM_LOCK:
        n = 0
        while True:
            tag = f"{os.getpid()}" + (f"_{n}" if n else "")
            candidate = path.with_name(f".{path.name}.{kind}-{_host()}-{tag}{suffix}")
            if str(candidate) not in _CLAIMED:
                _CLAIMED.add(str(candidate))
                return candidate
            n += 1


def _release(*paths: Path) -> None:
    with _CLAIM_LOCK:
        for path in paths:
            _CLAIMED.discard(str(path))


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def remove_stale(path: str | os.PathLike) -> None:
    """Remove the temporaries of `path` (`.NAME.tmp-HOST-PID...`) that processes of this host which no longer
    run left behind (killed mid-write), and put back a folder that `atomic_dir` had set aside as
    `.NAME.old-HOST-PID` when `path` is missing (a kill between the two renames of a swap). Temporaries of
    other hosts (a shared file system) are left alone: their processes cannot be checked from here."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.") + r"(tmp|old)-" + re.escape(_host())
                         + r"-(\d+)(?:_\d+)?(?:\..*)?$")
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or _running(int(match.group(2))):
            continue
        with contextlib.suppress(OSError):
            if match.group(1) == "old" and not os.path.lexists(path):
                os.rename(entry.path, path)
            elif entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        if directory:  # some file systems cannot open folders for syncing: best effort
            return
        raise
    try:
        with contextlib.suppress(OSError if directory else ()):
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_target(path: Path, follow_symlinks: bool) -> Path:
    """Where a write of `path` lands: the final target of a symbolic link (when followed), else `path`."""
    return Path(os.path.realpath(path)) if follow_symlinks and path.is_symlink() else path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, follow_symlinks: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so writers that go by it keep working); once the
    body has written it, it is flushed to disk and replaces `path` in one `os.replace`; on an error it goes.

    Missing parent folders are created. The new file gets the permission bits of the file it replaces, or
    `0o666` less the umask. A `path` that is a symbolic link is written through (its target is replaced,
    the link stays); with `follow_symlinks=False` the link itself is replaced by the file (checkpoints:
    Lightning's `save_last="link"` points `last.ckpt` at another checkpoint, which must not be
    overwritten). Temporaries left by killed processes are removed first (`remove_stale`).
    """
    path = _write_target(Path(path), follow_symlinks)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    mode = 0o666 & ~_umask()
    with contextlib.suppress(OSError):
        st = os.lstat(path)  # `path` is already the link's target when links are followed
        mode = stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else mode
    tmp = _claim(path, "tmp", _temp_suffix(path))
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        yield tmp
        os.chmod(tmp, mode)  # after the body: a writer may have recreated the file
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent, directory=True)
    finally:
        with contextlib.suppress(OSError):
            if os.path.lexists(tmp):
                os.unlink(tmp)
        _release(tmp)


def _swappable(out: Path) -> bool:
    """Whether `atomic_dir` may replace the folder `out` by renaming: no sub-folder, not a mount point, not
    this process's working folder or one above it."""
    try:
        if os.path.ismount(out) or any(e.is_dir(follow_symlinks=False) for e in os.scandir(out)):
            return False
        return not Path.cwd().resolve().is_relative_to(out.resolve())
    except OSError:
        return False


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside the folder `path`; once the body has written its files there,
    they become `path`'s, all or nothing. A failure in the body leaves `path` as it was (not created if it
    did not exist); the temporary folder is removed.

    The guarantee, precisely:
    - `path` missing: the temporary folder is renamed to `path` (one rename).
    - `path` an existing folder of files: the files of `path` that the body did not write are hard-linked
      into the temporary folder, then `path` is renamed aside to `.NAME.old-HOST-PID` and the temporary
      folder renamed to `path`, and the old folder is removed. Readers see the whole old set or the whole new
      one; if the process is killed between the two renames `path` is missing, and the next write of `path`
      (`remove_stale`) renames the old folder back.
    - otherwise (`path` holds sub-folders, is a mount point or this process's working folder, or the file
      system refuses hard links) the new files are moved into `path` with one `os.replace` each, after all
      of them are written: each file is whole, but a kill during these renames can leave old and new files
      side by side.
    A `path` that is a symbolic link to a folder is followed. The folder keeps its permission bits; new
    files get the usual ones (`0o666` less the umask).
    """
    out = _write_target(Path(path), True)
    if os.path.lexists(out) and not out.is_dir():
        raise NotADirectoryError(f"{path}: exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = _claim(out, "tmp")
    claimed = [tmp]
    try:
        os.mkdir(tmp, 0o700)
        yield tmp
        written = sorted(e.name for e in os.scandir(tmp))
        for name in written:
            if (tmp / name).is_file():
                _fsync(tmp / name)
        if not out.exists():
            os.chmod(tmp, 0o777 & ~_umask())
            os.rename(tmp, out)
        elif _swappable(out) and _link_others(out, tmp, written):
            os.chmod(tmp, stat.S_IMODE(out.stat().st_mode))
            old = _claim(out, "old")
            claimed.append(old)
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            for name in written:
                os.replace(tmp / name, out / name)
        _fsync(out.parent, directory=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _release(*claimed)


def _link_others(out: Path, tmp: Path, written: Iterable[str]) -> bool:
    """Hard-link the entries of `out` not in `written` into `tmp`; False (links undone) if one fails."""
    made: list[Path] = []
    written = set(written)
    try:
        for entry in os.scandir(out):
            if entry.name not in written:
                os.link(entry.path, tmp / entry.name, follow_symlinks=False)
                made.append(tmp / entry.name)
    except OSError:
        for link in made:
            link.unlink(missing_ok=True)
        return False
    return True


def _nearest_existing(folder: Path) -> Path:
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def check_writable_folder(folder: Path, name: str) -> None:
    """InputError naming `name` unless `folder` is a writable folder or can be created (its nearest existing
    ancestor is a writable folder). Writability is tried (a temporary file created and removed), not guessed
    from permission bits: ACLs, read-only mounts and root all answer truthfully."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise InputError(f"{name}: {existing} is not a folder")
    probe = _claim(existing / "lfmri-write-test", "tmp")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as err:
        what = f"folder {existing}" if existing == folder else f"{existing} (to create {folder})"
        raise InputError(f"{name}: cannot write in {what}: {err.strerror or type(err).__name__}") from None
    finally:
        _release(probe)


def check_input_file(path: str | os.PathLike, label: str = "", what: str = "file",
                     error: type[InputError] = InputError) -> Path:
    """`path` as a Path if it is a regular file (links followed); else `error` with one line naming `label`,
    the path and the problem: missing ("no such <what>"), a folder, or not a regular file (a device, a pipe).
    """
    path = Path(path)
    name = f"{label} {path}".strip()
    if path.is_file():
        return path
    if path.is_dir():
        raise error(f"{name}: is a folder, expected a {what}")
    if os.path.lexists(path) and not path.exists():
        raise error(f"{name}: a broken symbolic link (no such {what} {os.path.realpath(path)})")
    if path.exists():
        raise error(f"{name}: not a regular file, expected a {what}")
    raise error(f"{name}: no such {what}")


def check_output_file(path: str | os.PathLike, label: str = "", suffixes: Iterable[str] = (),
                      inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Check, before any work, that `path` can take a new file; returns where the write will land.

    InputError (one line: `label`, the path, the problem) when `path` does not end with one of `suffixes`
    (case-insensitive; none given: any), is a folder, is one of the `inputs` (the same file, links
    resolved), or its folder is neither writable nor creatable.
    """
    path = Path(path)
    name = f"{label} {path}".strip()
    suffixes = tuple(suffixes)
    if suffixes and not str(path).lower().endswith(tuple(s.lower() for s in suffixes)):
        raise InputError(f"{name}: must end with {' or '.join(suffixes)}")
    target = _write_target(path, True)
    if target.is_dir():
        raise InputError(f"{name}: is a folder, expected a file path")
    if target.exists():
        for other in inputs:
            if other is not None and Path(other).exists() and os.path.samefile(target, other):
                raise InputError(f"{name}: would overwrite the input {other}")
    check_writable_folder(target.parent, name)
    return target


def check_output_dir(path: str | os.PathLike, label: str = "") -> Path:
    """Check, before any work, that `path` can receive `atomic_dir`'s folder; returns the folder (links
    resolved). InputError when it exists and is not a folder, or when the folder beside which the temporary
    folder goes is neither writable nor creatable."""
    path = Path(path)
    name = f"{label} {path}".strip()
    if os.path.lexists(path) and not path.is_dir():
        raise InputError(f"{name}: exists and is not a folder")
    target = Path(os.path.realpath(path))
    check_writable_folder(target.parent, name)
    return target

