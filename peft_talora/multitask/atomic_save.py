"""Writing a folder so that a failed or killed write never loses what was there.

``write_folder_atomically(target, write, replaces)`` runs ``write`` on a new, hidden folder beside
``target`` (same parent, so same filesystem), carries every entry of the old ``target`` that the
write does not replace into it (hard links, or copies where links are impossible), and only then
swaps it with ``target`` in one step: Linux's ``renameat2(RENAME_EXCHANGE)``. At every instant
``target`` is either the whole old folder or the whole new one; a crash leaves a hidden
``.<name>.peft-tmp-<pid>-h<host>-<hex>`` folder beside it, removed by the next save into the same
target once that process is gone. Only a save on the same machine (``<host>``: a hash of the host
name) removes it: on a filesystem shared by several nodes a process id says nothing about another
node's save, which may still be running. Files other processes write into ``target`` during the
save (the other ranks of a distributed ``Trainer`` write their RNG state into a checkpoint folder
while the main one saves the model) are carried over too, also when they create ``target`` first.

Two weaker cases, both documented in ``docs/faq.md``:

- Without an atomic exchange (other systems, filesystems without it), the swap is two renames; a
  crash between them leaves ``target`` missing and the old folder whole under
  ``.<name>.peft-old-<pid>-<hex>``, which the next save into ``target`` puts back first.
- When ``target`` cannot be replaced as a whole (a mount point, or a parent folder we may not write
  to), files are replaced one by one with ``os.replace``, weights first and the config last: every
  file is complete at every instant, but a crash in between can pair new weights with the old
  config. A ``UserWarning`` says so.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import warnings
from collections.abc import Callable

#: Marks the temporary and old folders of a save beside (or, file by file, inside) the target.
TMP_MARK, OLD_MARK = "peft-tmp", "peft-old"
#: This machine in the names of those folders: another node's leftovers on a shared filesystem are not ours to judge.
HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def write_folder_atomically(
    target: str, write: Callable[[str], None], replaces: Callable[[str], bool], seed: tuple[str, ...] = ()
) -> None:
    """Run ``write(folder)`` on a fresh folder and put it in ``target``'s place only if it returns.

    ``replaces(relpath)`` is true for the old files the write rewrites (they are not carried over,
    even when the write does not produce them again, e.g. weights saved in the other format);
    ``seed`` names old files copied in before the write because it updates them (a README).
    """
    target = os.path.realpath(target)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    _clean_leftovers(parent, name, target)
    exists = os.path.isdir(target)
    try:
        if exists and os.path.ismount(target):
            raise PermissionError(errno.EBUSY, "a mount point cannot be swapped", target)
        folder = _new_folder(parent, f".{name}.{TMP_MARK}")
    except OSError as error:
        if not exists:
            raise
        return _write_file_by_file(target, write, replaces, seed, reason=error)
    try:
        for relpath in seed if exists else ():
            if os.path.isfile(os.path.join(target, relpath)):
                shutil.copy2(os.path.join(target, relpath), os.path.join(folder, relpath))
        write(folder)
        if exists:
            _carry_over(target, folder, replaces)
            shutil.copymode(target, folder)
        _fsync_new_files(folder)
        cwd = _cwd_inside(target)
        if not exists and not _rename_onto_nothing(folder, target):
            # another process made the folder meanwhile (a DDP rank writing its RNG state into a checkpoint): keep its files
            exists = True
            _carry_over(target, folder, replaces)
        if exists:
            if _exchange(folder, target):
                displaced = folder
            else:
                displaced = _new_name(parent, f".{name}.{OLD_MARK}")
                os.rename(target, displaced)
                try:
                    os.rename(folder, target)
                except BaseException:
                    os.rename(displaced, target)  # the old folder goes back where it was, whole
                    raise
            # files other processes wrote into the old folder while this one was saving go along too
            _carry_over(displaced, target, replaces)
            if displaced != folder:
                shutil.rmtree(displaced, ignore_errors=True)
        _fsync_dir(parent)
        if cwd is not None:  # our working directory was inside the old folder: follow the new one
            os.chdir(os.path.join(target, cwd) if os.path.isdir(os.path.join(target, cwd)) else target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # after the exchange: the old folder


def _write_file_by_file(target, write, replaces, seed, reason: OSError) -> None:
    """Fallback: write into a hidden folder inside ``target``, then ``os.replace`` file by file."""
    warnings.warn(
        f"{target!r} cannot be replaced as a whole ({reason.strerror or reason}); its files are replaced one by "
        "one: each file is always complete, but if the process dies in between, the folder can hold the new "
        "weights with the old config. Save into a subfolder to get the all-or-nothing swap.",
        stacklevel=4,
    )
    folder = _new_folder(target, f".{TMP_MARK}")
    try:
        for relpath in seed:
            if os.path.isfile(os.path.join(target, relpath)):
                shutil.copy2(os.path.join(target, relpath), os.path.join(folder, relpath))
        write(folder)
        _fsync_new_files(folder)
        written = [os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files]
        config_last = sorted(written, key=lambda p: (os.path.basename(p) == "adapter_config.json", p))
        stale = [p for p in _old_files(target) if replaces(p) and p not in written]
        for relpath in config_last:
            if stale and os.path.basename(relpath) == "adapter_config.json":
                for old in stale:  # weights of the other format would be loaded with the new config
                    os.remove(os.path.join(target, old))
                stale = []
            os.makedirs(os.path.dirname(os.path.join(target, relpath)), exist_ok=True)
            os.replace(os.path.join(folder, relpath), os.path.join(target, relpath))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _rename_onto_nothing(folder: str, target: str) -> bool:
    """``os.rename(folder, target)`` where ``target`` was absent; ``False`` if a non-empty one appeared meanwhile."""
    try:
        os.rename(folder, target)
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    return True


def _old_files(root: str) -> list[str]:
    return [
        os.path.relpath(os.path.join(d, f), root)
        for d, dirs, files in os.walk(root)
        for f in files
        if TMP_MARK not in os.path.relpath(d, root)
    ]


def _carry_over(source: str, destination: str, replaces: Callable[[str], bool], relative: str = "") -> None:
    """Link (or copy) into ``destination`` every entry of ``source`` it lacks, except those ``replaces``."""
    for entry in os.scandir(os.path.join(source, relative)):
        relpath = os.path.join(relative, entry.name)
        new = os.path.join(destination, relpath)
        if TMP_MARK in entry.name and entry.name.startswith("."):
            continue  # a leftover of an interrupted file-by-file save
        if entry.is_dir(follow_symlinks=False):
            if not os.path.lexists(new):
                os.mkdir(new)
                shutil.copystat(entry.path, new)
            if os.path.isdir(new) and not os.path.islink(new):
                _carry_over(source, destination, replaces, relpath)
        elif os.path.lexists(new) or replaces(relpath):
            continue
        elif entry.is_symlink():
            os.symlink(os.readlink(entry.path), new)
        elif entry.is_file(follow_symlinks=False):
            try:
                os.link(entry.path, new)  # no copy of a user's large files; never written through (only added)
            except OSError:
                shutil.copy2(entry.path, new)


def _new_name(parent: str, prefix: str) -> str:
    return os.path.join(parent, f"{prefix}-{os.getpid()}-h{HOST_TAG}-{secrets.token_hex(4)}")


def _new_folder(parent: str, prefix: str) -> str:
    """A new folder with the permissions ``os.makedirs`` would give (``mkdtemp`` would make it private)."""
    folder = _new_name(parent, prefix)
    os.mkdir(folder)
    return folder


def _clean_leftovers(parent: str, name: str, target: str) -> None:
    """Remove what killed saves into ``target`` left behind; put an old folder back if ``target`` is gone."""
    for location, prefix in ((parent, f".{name}."), (target, ".")):
        if not os.path.isdir(location):
            continue
        pattern = re.compile(rf"{re.escape(prefix)}({TMP_MARK}|{OLD_MARK})-(\d+)(?:-h([0-9a-f]{{8}}))?-[0-9a-f]+")
        for entry in os.listdir(location):
            match = pattern.fullmatch(entry)
            if match is None or match.group(3) not in (None, HOST_TAG):  # (no tag: written before tags existed)
                continue
            if not _process_is_gone(int(match.group(2))):
                continue
            path = os.path.join(location, entry)
            if match.group(1) == OLD_MARK and location == parent and not os.path.exists(target):
                os.rename(path, target)  # killed between the two renames: the old folder is the good one
            else:
                shutil.rmtree(path, ignore_errors=True)


def _process_is_gone(pid: int) -> bool:
    if os.name != "posix" or pid == os.getpid():
        return False  # on Windows os.kill(pid, 0) would stop the process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux ``renameat2`` with ``RENAME_EXCHANGE``); ``False`` where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), b)


def _cwd_inside(folder: str):
    """Our working directory relative to ``folder`` when it lies inside it, else ``None``."""
    try:
        cwd = os.getcwd()
    except OSError:
        return None
    return os.path.relpath(cwd, folder) if cwd == folder or cwd.startswith(folder + os.sep) else None


def _fsync_new_files(folder: str) -> None:
    """Flush what the write produced to disk, so a power loss after the swap cannot leave empty files."""
    for directory, _, files in os.walk(folder):
        for name in files:
            info = os.lstat(os.path.join(directory, name))
            if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:  # hard links to old files are on disk already
                _fsync(os.path.join(directory, name))
        _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    if os.name == "posix":
        _fsync(directory)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
