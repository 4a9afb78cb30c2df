"""A saved model folder: the files a ``save_pretrained`` writes, and writing one atomically.

What a save may replace: a save writes a whole new folder and puts it at its path at once, so whatever the old
folder held is gone. It therefore only replaces a *model folder* -- one with ``config.json`` (or a PEFT
``adapter_config.json``) and nothing but files a ``save_pretrained`` writes (weights and their index, configs,
tokenizer files, ``recovery_prompt/``, ``compression_report.json``, ``README.md``) -- and only when asked to
(``overwrite=True``; on the command line ``--overwrite``). A path that is a file, or a folder holding any other
file, is refused with that file named (:func:`check_save_target`); a missing or empty folder needs no flag.

Every save of this package goes through :func:`atomic_directory`: the model's
(:func:`hf_compress_prompt.integrations.checkpoints.save_pretrained`), a recovery prompt's
(:func:`hf_compress_prompt.recovery.save_recovery_prompt`) and the command line's.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .._logging import get_logger
from ..errors import UserInputError

__all__ = ["METADATA_SUBFOLDER", "PROMPT_SUBFOLDER", "SPARSITY_MASKS", "atomic_directory", "check_save_target"]

logger = get_logger(__name__)

PROMPT_SUBFOLDER = "recovery_prompt"  # a model saved with a recovery prompt attached keeps it in this subfolder
# Files a ``save_pretrained`` (model, generation config, tokenizer, PEFT adapter, recovery prompt, this package's
# report and card) writes; a folder holding only these (and config.json) is a model folder a save may replace.
_SAVED_FILES = frozenset({
    "config.json", "generation_config.json", "adapter_config.json", "README.md", "compression_report.json",
    "recovery_prompt.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json",
})
_SAVED_WEIGHTS = re.compile(r"(model|pytorch_model|adapter_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?")
_MODEL_MARKERS = ("config.json", "adapter_config.json")
_CHAT_TEMPLATES = "additional_chat_templates"  # transformers saves extra chat templates there (*.jinja)
METADATA_SUBFOLDER = "hf_compress_prompt"  # this package's own files in a folder another format describes
SPARSITY_MASKS = "sparsity_masks.safetensors"  # in it: the keep masks of a compressed-tensors export's sparse layers
_STAGING_MARKER = ".hf_compress_prompt-staging.json"  # inside every staging folder this module creates
_ACTIVE: set[Path] = set()  # staging folders being written by this process
_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2  # <fcntl.h>, <linux/fs.h>


def _staging_prefix(target: Path) -> str:
    return f".{target.name[:64]}.tmp-"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _staging_info(folder: Path) -> dict | None:
    """The marker of a staging folder this module created (None for anything else)."""
    try:
        info = json.loads((folder / _STAGING_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None


def _is_stale(folder: Path, info: dict) -> bool:
    """Whether the process that created staging folder ``folder`` is gone (on this machine, since this boot)."""
    if info.get("host") != socket.gethostname():
        return False  # another machine's save (shared file system): its pid means nothing here
    if info.get("boot_id") and _boot_id() and info["boot_id"] != _boot_id():
        return True
    if info["pid"] == os.getpid():
        return folder / "model" not in _ACTIVE
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _clean_stale(target: Path) -> None:
    """Removes the staging folders beside ``target`` that a killed save left (ours by their marker, their process
    gone); one that holds the previous folder of an interrupted replace puts it back first if ``target`` is missing."""
    if not target.parent.is_dir():
        return
    prefix = _staging_prefix(target)
    for entry in sorted(target.parent.iterdir()):
        if not entry.name.startswith(prefix) or entry.is_symlink() or not entry.is_dir():
            continue
        info = _staging_info(entry)
        if info is None or info.get("target") != str(target) or not _is_stale(entry, info):
            continue
        previous = entry / "previous"
        if previous.is_dir() and not os.path.lexists(target):
            os.rename(previous, target)
            logger.warning("restored %s, which an interrupted save (process %s) had moved aside", target, info["pid"])
        shutil.rmtree(entry, ignore_errors=True)
        logger.info("removed %s, left by an interrupted save (process %s)", entry, info["pid"])


def _foreign_entry(folder: Path, top: bool = True) -> str | None:
    """The first entry of ``folder`` (sorted; a relative path, folders ending in ``/``) that no ``save_pretrained``
    writes, or None."""
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            return entry.name
        if entry.is_dir():
            if top and entry.name == PROMPT_SUBFOLDER:
                inner = _foreign_entry(entry, top=False)
            elif top and entry.name == METADATA_SUBFOLDER:
                inner = next((f.name for f in sorted(entry.iterdir()) if f.is_symlink() or not f.is_file()
                              or f.name != SPARSITY_MASKS), None)
            elif top and entry.name == _CHAT_TEMPLATES:
                inner = next((f.name for f in sorted(entry.iterdir()) if f.is_symlink() or not f.is_file()
                              or f.suffix != ".jinja"), None)
            elif _staging_info(entry) is not None:  # a staging folder of ours (a prompt saved into this folder)
                continue
            else:
                return f"{entry.name}/"
            if inner is not None:
                return f"{entry.name}/{inner}"
        elif not (entry.is_file() and (entry.name in _SAVED_FILES or _SAVED_WEIGHTS.fullmatch(entry.name))):
            return entry.name
    return None


def check_save_target(save_directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Checks that a save may write ``save_directory`` (call it before the work whose result is saved there) and
    returns its resolved path. Staging folders that killed saves left beside it are removed first.

    Args:
        save_directory (`str` or `os.PathLike`): the folder a save will create or replace.
        overwrite (`bool`, *optional*, defaults to `False`): allow replacing a saved model folder (its files are all
            removed: the new folder replaces it whole).

    Raises:
        UserInputError: the path is a file, a mount point or the current folder; it cannot be created or written;
            it is a folder holding a file that no ``save_pretrained`` writes (named); or it holds a saved model
            and ``overwrite`` is `False`.
    """
    path = Path(save_directory).expanduser()
    target = path.resolve()
    cwd = Path.cwd()
    if target == cwd or target in cwd.parents:
        raise UserInputError(f"{str(path)!r} is the current folder or holds it; a save replaces its folder whole, so "
                             f"save into a new subfolder instead, e.g. {str(path / 'model')!r}")
    if os.path.lexists(target) and not target.is_dir():
        raise UserInputError(f"{str(path)!r} is a file, not a folder; pass a folder path to save the model in "
                             "(a missing one is created)")
    if target.is_dir() and os.path.ismount(target):
        raise UserInputError(f"{str(path)!r} is a mount point, which a save cannot replace; save into a subfolder of it")
    existing = next(p for p in target.parents if os.path.lexists(p))
    if not existing.is_dir():
        raise UserInputError(f"cannot create {str(path)!r}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"cannot save to {str(path)!r}: {str(existing)!r} is not writable; choose another folder")
    _clean_stale(target)
    if not target.is_dir():
        return target
    foreign = _foreign_entry(target)
    if foreign is not None:
        raise UserInputError(f"{str(path)!r} holds {foreign!r}, which no save_pretrained writes; a save replaces the "
                             "folder whole and would delete it, so it is refused: save into a new or empty folder, or "
                             f"move {foreign!r} out")
    entries = [e for e in target.iterdir() if _staging_info(e) is None]
    if entries and not any((target / name).is_file() for name in _MODEL_MARKERS):
        raise UserInputError(f"{str(path)!r} is not a saved model folder (no config.json) but holds "
                             f"{min(e.name for e in entries)!r}; save into a new or empty folder")
    if entries and not overwrite:
        raise UserInputError(f"{str(path)!r} already holds a saved model; pass overwrite=True (command line: "
                             "--overwrite) to replace it, or choose a new folder")
    return target


@functools.cache
def _libc_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).renameat2  # glibc >= 2.28, musl
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _renameat2(source: Path, destination: Path, flags: int) -> bool:
    """``renameat2(source, destination, flags)`` (Linux >= 3.15); False where the C library, the kernel or the
    file system lacks it (the caller falls back to plain renames)."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(destination), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(destination))


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (and put it back at once)
    os.umask(mask)
    return mask


def _apply_umask(folder: Path) -> None:
    """Folders 0777 and files 0666 less the umask, as a plain save makes them (not the staging folder's 0700/0600)."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _move_into_place(folder: Path, target: Path, staging: Path) -> None:
    if not os.path.lexists(target):
        if not _renameat2(folder, target, _RENAME_NOREPLACE):
            os.rename(folder, target)
        return
    if _renameat2(folder, target, _RENAME_EXCHANGE):  # one step: the old folder is now at `folder`
        return
    previous = staging / "previous"
    os.rename(target, previous)  # nothing is at `target` from here to the next rename (a kill: the next save restores it)
    try:
        os.rename(folder, target)
    except BaseException:
        os.rename(previous, target)
        raise


@contextlib.contextmanager
def atomic_directory(save_directory: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a new folder to write a save into, then puts it at ``save_directory`` in one step.

    The folder is ``model/`` inside a hidden staging folder ``.NAME.tmp-PID-*`` beside the target (with a marker
    file naming this process). When the block ends, its permissions are set from the umask (folders 0777, files
    0666, less the umask, as a plain save makes them) and it is exchanged with the old folder by
    ``renameat2(RENAME_EXCHANGE)`` (Linux >= 3.15, on most file systems), so a loadable folder is at the path at
    every instant. Where that call is missing, the old folder is renamed aside and the new one into place: between
    those two renames nothing is at the path, and a save killed there has its old folder put back by the next save
    to that path. On any error (``KeyboardInterrupt`` included) the staging folder is removed and the target left
    as it was; staging folders of killed saves (their process gone) are removed by the next save to that path.
    Nothing else is ever deleted: the target is checked by :func:`check_save_target` before and again right
    before the exchange.

    A save nested in another one's staging folder (``model.save_pretrained(staging)`` inside
    :func:`save_pretrained`) writes into it directly: the outer one makes it atomic.

    Args:
        save_directory (`str` or `os.PathLike`): the folder to create or replace.
        overwrite (`bool`, *optional*, defaults to `False`): allow replacing a saved model folder.
    """
    target = Path(save_directory).expanduser().resolve()
    if target in _ACTIVE:
        yield target
        return
    check_save_target(save_directory, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(target)}{os.getpid()}-", dir=target.parent))
    folder = staging / "model"
    try:
        (staging / _STAGING_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                           "boot_id": _boot_id(), "target": str(target)}))
        folder.mkdir()
        _ACTIVE.add(folder)
        yield folder
        _apply_umask(folder)
        check_save_target(save_directory, overwrite)  # the target may have changed during a long save
        _move_into_place(folder, target, staging)
    finally:
        _ACTIVE.discard(folder)
        shutil.rmtree(staging, ignore_errors=True)
