"""The offload folder of disk-tier weights: verified, never trusted by name.

One folder per `OffloadIdentity` (offload_identity.py: the checkpoint's safetensors headers
hashed with each file's size and mtime, the storage dtype, the compression settings), named by
its digest, inside the user's `--offload-dir` (which may be a shared place such as /tmp). The
folder is private: created 0o700, and an existing one that is a link, is not ours, or that others
can write is refused.

The manifest is one entry per tensor: `<key>.bin` holds the bytes, `<key>.entry.json` records
the identity digest, the size, the checksum computed while writing, and the mtime of the data
file; each is written atomically (`write_file`, through `files.replacing`), the entry last. Ranks of a pipeline
write their own layers into the same folder at once, so there is no shared manifest file to
clobber; the rule is lock-free: a reader trusts a tensor only when its entry exists, matches this
identity and the expected size, and the data file is a plain file of ours whose size and mtime
are those the entry recorded. Anything else - no entry (a crash between the two renames), a
stale entry, a link - means "write it again". A trusted file is not read again at start (a run
must not re-hash hundreds of GB); `verify=True` (`--verify-offload`) re-hashes each one first.

Reading stays with `DiskTensor`, by the path `trusted` or `write` returns.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import stat
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import EnvironmentFailure, UserError
from ..files import remove_stale_temps, replacing, unlink_quietly, write_all
from .offload_identity import FOLDER_PREFIX, OffloadIdentity, checkpoint_identity
from .piece_hash import PieceHasher, hash_file, hashing_pool, pieces, scheme

log = logging.getLogger(__name__)

FORMAT = 1  # of the entries; bump when their meaning changes (old entries are then not trusted)
DATA_SUFFIX = ".bin"
ENTRY_SUFFIX = ".entry.json"
IDENTITY_NOTE = "identity.json"  # for people looking into the folder; not what trust rests on
# Small files we read are opened without following a link, and without blocking on a planted FIFO.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")  # checkpoint keys; never a path


class OffloadFolder:
    """The verified folder of one identity inside `offload_dir`; open it once per process.

    Construction creates or checks the private folder (`UserError` when it is unsafe) and removes
    the temporary files of dead writers. Then, per tensor: `trusted(key, nbytes)` gives the path
    of a complete file, or None when it must be (re)written with `write(key, data)`."""

    def __init__(self, offload_dir: str | Path, identity: OffloadIdentity, *, verify: bool = False,
                 weight_files: Iterable[str | Path] = ()):
        self.identity = identity
        self.weight_files = sorted(str(Path(p).absolute()) for p in weight_files)  # noted, for `stale_folders`
        self.verify = verify
        self.path = Path(offload_dir) / identity.folder_name
        self._dir_fd = _open_private_folder(self.path)
        self._close = weakref.finalize(self, os.close, self._dir_fd)
        self._verified: set[str] = set()  # keys hashed (or written) by this process: not hashed again
        removed = remove_stale_temps(self._dir_fd)  # a private folder: every file is ours
        if removed:
            log.info("removed %d temporary files of interrupted runs from %s", len(removed), self.path)
        self._note_identity()

    def close(self) -> None:
        self._close()
        self._dir_fd = -1  # later use fails (EBADF) rather than reach whatever reuses the number

    def __enter__(self) -> "OffloadFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def file(self, key: str) -> Path:
        """Where the bytes of `key` live (trust them only through `trusted` or `write`)."""
        return self.path / f"{_checked(key)}{DATA_SUFFIX}"

    def trusted(self, key: str, nbytes: int) -> Path | None:
        """The path of `key`'s complete file of `nbytes` bytes, or None when it must be written."""
        reason = self._distrust(_checked(key), nbytes)
        if reason is not None:
            log.debug("%s: %s; it will be written", self.file(key), reason)
            return None
        return self.file(key)

    def missing_bytes(self, sizes: Mapping[str, int]) -> int:
        """Bytes still to write for these {key: nbytes}: what `check_offload_space` must find free."""
        return sum(nbytes for key, nbytes in sizes.items() if self.trusted(key, nbytes) is None)

    def write(self, key: str, data: torch.Tensor | bytes | memoryview) -> Path:
        """Store `data` (a tensor's raw bytes in its own dtype: convert it to the storage dtype
        first) as `key`, whole or not at all, and record its entry; returns the path to read.
        Raises `EnvironmentFailure` when the disk fails (full, I/O error)."""
        name = _checked(key)
        raw = _raw_bytes(data)
        unlink_quietly(self._dir_fd, name + ENTRY_SUFFIX)  # the key is untrusted until its new entry lands
        written = write_file(self._dir_fd, name + DATA_SUFFIX, raw, self.path)
        entry = {
            "format": FORMAT,
            "key": name,
            "identity": self.identity.digest,
            "size": written.size,
            "hash": scheme(),
            "digest": written.digest,
            "mtime_ns": written.mtime_ns,
        }
        try:
            write_file(self._dir_fd, name + ENTRY_SUFFIX, _json_bytes(entry), self.path)
        except BaseException:  # a data file without its entry is never trusted: free its space now
            unlink_quietly(self._dir_fd, name + DATA_SUFFIX)
            raise
        self._verified.add(name)
        return self.file(name)

    def _distrust(self, name: str, nbytes: int) -> str | None:
        """Why `name` cannot be trusted, or None when it can."""
        entry = self._read_entry(name)
        if entry is None:
            return "no readable entry"
        expected = {"format": FORMAT, "key": name, "identity": self.identity.digest, "size": nbytes, "hash": scheme()}
        if any(entry.get(field) != value for field, value in expected.items()):
            return "its entry is of another file"
        try:
            st = os.stat(name + DATA_SUFFIX, dir_fd=self._dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return "no data file"
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return "the data file is not a plain file of ours"
        if st.st_size != nbytes or st.st_mtime_ns != entry.get("mtime_ns"):
            return "the data file changed after its entry was written"
        if self.verify and name not in self._verified:
            size, digest = hash_file(self._dir_fd, name + DATA_SUFFIX)
            if (size, digest) != (nbytes, entry.get("digest")):
                log.warning("%s does not match its recorded checksum; writing it again", self.file(name))
                return "checksum mismatch"
            self._verified.add(name)
        return None

    def _read_entry(self, name: str) -> dict | None:
        try:
            fd = os.open(name + ENTRY_SUFFIX, _READ_FLAGS, dir_fd=self._dir_fd)
        except OSError:  # missing, or a link (ELOOP): not an entry we wrote
            return None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            try:
                entry = json.loads(f.read(1 << 16))
            except (ValueError, UnicodeDecodeError):
                return None
        return entry if isinstance(entry, dict) else None

    def _note_identity(self) -> None:
        """Write identity.json once (a reused folder's files keep their mtimes)."""
        note = _json_bytes({"format": FORMAT, "digest": self.identity.digest, **dataclasses.asdict(self.identity),
                            **({"weight_files": self.weight_files} if self.weight_files else {})})
        try:
            fd = os.open(IDENTITY_NOTE, _READ_FLAGS, dir_fd=self._dir_fd)
            with os.fdopen(fd, "rb") as f:
                if f.read(len(note) + 1) == note:
                    return
        except OSError:
            pass
        write_file(self._dir_fd, IDENTITY_NOTE, note, self.path)


@dataclass(frozen=True)
class StaleFolder:
    path: Path
    nbytes: int
    why: str  # e.g. "its checkpoint file /models/x/model.safetensors no longer exists"


def stale_folders(offload_dir: str | Path, *, keep: str) -> list[StaleFolder]:
    """The weight folders in `offload_dir` (other than `keep`) whose checkpoint is gone: a weight
    file their identity note names no longer exists, or it has changed since (its headers, size or
    mtime give another identity). Only private folders of ours with a note of this format are
    considered; a generated source's, or one noted before the files were recorded, is left alone."""
    found = []
    try:
        names = sorted(os.listdir(offload_dir))
    except OSError:
        return found
    for name in names:
        path = Path(offload_dir) / name
        if not name.startswith(FOLDER_PREFIX) or name == keep or path.is_symlink() or not path.is_dir():
            continue
        try:
            st = path.stat()
            if st.st_uid != os.geteuid() or st.st_mode & 0o077:
                continue
            fd = os.open(path / IDENTITY_NOTE, _READ_FLAGS)
            with os.fdopen(fd, "rb") as f:
                note = json.loads(f.read(1 << 20))
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        files = note.get("weight_files") if isinstance(note, dict) else None
        if note.get("format") != FORMAT or not isinstance(files, list) or not files \
                or not all(isinstance(p, str) for p in files):
            continue
        missing = [p for p in files if not os.path.isfile(p)]
        if missing:
            why = f"its checkpoint file {missing[0]} no longer exists"
        else:
            try:
                now = checkpoint_identity(files, storage_dtype=note.get("storage_dtype", ""),
                                          compression=note.get("compression"))
            except (UserError, EnvironmentFailure, ValueError, ImportError):  # unreadable now, or no gguf package
                continue
            if now.digest == note.get("digest"):
                continue
            why = f"its checkpoint ({os.path.dirname(files[0])}) has changed since"
        nbytes = sum(p.stat().st_size for p in path.iterdir() if p.is_file() and not p.is_symlink())
        found.append(StaleFolder(path, nbytes, why))
    return found


def remove_folder(stale: StaleFolder) -> None:
    """Remove a stale weight folder: its plain files, then the folder (nothing else is in one)."""
    dir_fd = _open_private_folder(stale.path)
    try:
        for name in os.listdir(dir_fd):
            unlink_quietly(dir_fd, name)
    finally:
        os.close(dir_fd)
    os.rmdir(stale.path)


@dataclass(frozen=True)
class WrittenFile:
    """What `write_file` wrote: enough to trust the file later without reading it again."""

    size: int
    digest: str  # `piece_hash` digest of the bytes, computed while writing them
    mtime_ns: int  # of the inode we wrote (a rename keeps it)


def write_file(dir_fd: int, name: str, data: memoryview, where: Path) -> WrittenFile:
    """Write `data` as file `name` of the folder open as `dir_fd` (whose path is `where`, for
    messages): whole or not at all, hashed while written. Raises `EnvironmentFailure` when the
    disk fails us (full, quota, I/O error, anything else); `name` is left as it was."""
    try:
        with replacing(dir_fd, name, where=where) as fd:
            digest = _write_hashed(fd, data, where / name)
            mtime_ns = os.fstat(fd).st_mtime_ns
    except OSError as exc:
        raise EnvironmentFailure(f"cannot write {str(where / name)!r}: {exc.strerror or exc}") from None
    return WrittenFile(size=len(data), digest=digest, mtime_ns=mtime_ns)


def _write_hashed(fd: int, data: memoryview, path: Path) -> str:
    """Write all of `data` to `fd`, returning its digest: each piece is hashed on other threads
    while it is written (both release the GIL), so hashing costs no wall time on a machine with
    cores to spare."""
    parts = pieces(data)
    with hashing_pool(len(parts)) as pool:
        hasher = PieceHasher(pool)
        for piece in parts:
            hasher.add(piece)
            write_all(fd, piece, path)
        return hasher.hexdigest()


def _open_private_folder(path: Path) -> int:
    """An open descriptor of `path`, created 0o700 when missing; refuses a link, a non-folder,
    one owned by another user and one that group or others can write (`UserError`)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise UserError(f"--offload-dir {path.parent} cannot be created ({exc.strerror}); create it or choose another folder") from None
    parent_mode = path.parent.stat().st_mode
    if parent_mode & 0o022 and not parent_mode & stat.S_ISVTX:
        log.warning("--offload-dir %s is writable by others without the sticky bit: they could rename our folders", path.parent)
    try:
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        created = False
    except OSError as exc:
        raise UserError(f"cannot create the offload folder {path} ({exc.strerror}); choose another --offload-dir") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        what = "a symbolic link" if path.is_symlink() else f"not a usable folder ({exc.strerror})"
        raise UserError(f"the offload folder {path} is {what}; remove it (it is rebuilt) or choose another --offload-dir") from None
    st = os.fstat(fd)
    problem = None
    if st.st_uid != os.geteuid():
        problem = f"is owned by uid {st.st_uid}, not you (uid {os.geteuid()}); remove it (it is rebuilt) or choose another --offload-dir"
    elif st.st_mode & 0o022:
        problem = f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); run chmod go-w {path} or remove it"
    if problem is not None:
        os.close(fd)
        raise UserError(f"the offload folder {path} {problem}")
    if created:
        os.fchmod(fd, 0o700)  # whatever the umask
    return fd


def _checked(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise ValueError(f"offload key {key!r} is not a plain name (letters, digits, '.', '_', '-'; at most 200)")
    return key


def _raw_bytes(data: torch.Tensor | bytes | memoryview) -> memoryview:
    if isinstance(data, torch.Tensor):
        flat = data.detach().to("cpu").contiguous().reshape(-1)
        return memoryview(flat.view(torch.uint8).numpy())
    return memoryview(data).cast("B")


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
