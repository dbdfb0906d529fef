"""Resumable output: results are appended to a progress file as blocks finish, and a rerun of the
same command after a crash (SIGKILL at any moment) skips what is finished.

Files, for `--output OUT`:
- `OUT.partial`: finished output lines, in the order they finished. Every `append` writes whole
  lines and fsyncs once; a crash can only leave a torn last line, which the next open drops
  (truncating the file back to the last complete line).
- `OUT.run.json`: the run's identity (model, input file content, generation settings, shard,
  output format) and start time. A rerun with another identity is refused; `--overwrite` starts over.
- `OUT` itself appears only at the end, whole (`finish`: input order, each id once, temp file +
  fsync + rename), then the two progress files are removed (the progress file first).
- `OUT.made-by.json` (`keep_provenance`): the run record and the sha256 of `OUT`'s bytes, written
  once `OUT`'s temporary file is whole, just before it takes its name, and kept: `merge` refuses
  shards that other runs made, and the same command run again once `OUT` is finished (a SLURM
  requeue) finds it complete and changes nothing.

States found at open (without --overwrite): nothing -> a fresh run; record + progress -> resume;
record without progress while OUT exists -> the earlier run was killed after its rename: OUT is
complete, the record is removed, every id counts as finished and `finish` only checks the ids;
OUT without a record, made by this same run (its provenance names this identity and OUT's bytes
still hash as recorded) -> complete, nothing written; OUT without a record otherwise -> a file
this run did not make, or made with other settings: refused; progress with results but no
record -> refused (which run made them?).
A lock (flock) on the progress file refuses a second process writing the same output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence, TextIO

from ..errors import EnvironmentFailure, UserError
from ..files import atomic_output, fsync_file, fsync_folder, open_nofollow, remove_stale_temps, write_all, write_atomic
from .outputs import (STDOUT, RunIdentity, StdoutLog, check_output_path, progress_paths, provenance_path,
                      read_run_record, row_key)

try:
    import fcntl
except ImportError:  # not POSIX: no lock, the rest works
    fcntl = None

log = logging.getLogger(__name__)


class ResumeLog:
    """The progress of one output file. Build with `open_for_resume`."""

    def __init__(self, output: Path, fd: int, index: dict[str, tuple[int, int]], size: int,
                 started_at: int, complete_order: list[str] | None, rerun: str = "run the same command again") -> None:
        self.output = output
        self.rerun = rerun  # how to resume: never "the same command" when that holds --overwrite
        self._partial, self._record = progress_paths(output)
        self._fd = fd
        self._index = index  # id key -> (offset, length) of its line in the progress file
        self._size = size
        self.started_at = started_at  # Unix time the run first started (OpenAI's `created`)
        self._complete_order = complete_order  # set when OUT was already complete at open
        self._made_by: dict | None = None  # the run record to keep beside the output (keep_provenance)

    @property
    def finished(self):
        """Id keys (Request.key) with a result; a live view: `key in log.finished`."""
        return self._index.keys()

    @property
    def complete(self) -> bool:
        return self._complete_order is not None

    def keep_provenance(self, identity: RunIdentity) -> None:
        """Write the run record beside the output (`provenance_path`) when the run finishes, with
        the output's sha256, just before the output takes its name, and keep it."""
        self._made_by = {**identity.record(), "started_at": self.started_at}

    def check_ids(self, keys: Iterable[str], input_path: str | os.PathLike | None) -> None:
        """Refuse saved results for ids this run's input does not have, naming the progress
        file's line, before anything is computed (finish() could not write the output)."""
        keys = list(keys)
        source = f"{os.fspath(input_path)!r}" if input_path is not None else "this run's prompts"
        if self.complete:
            if keys != self._complete_order:
                raise UserError(f"--output {str(self.output)!r} is complete but does not answer the ids of {source} in "
                                f"order; it holds another run's results: choose another --output, or pass --overwrite")
            return
        wanted = set(keys)
        foreign = [(offset, key) for key, (offset, _) in self._index.items() if key not in wanted]
        if not foreign:
            return
        offset, key = min(foreign)
        raise UserError(f"{self._partial}:{_line_at(self._fd, offset)}: id {key} is not in {source} ({len(foreign)} "
                        f"such saved results); the file was edited or belongs to other prompts: delete those lines "
                        f"and rerun the same command (the other results are kept), or pass --overwrite to start over")

    def append(self, rows: Sequence[dict]) -> None:
        """Append finished output lines (one call per block): whole lines, one fsync."""
        self._check_open()
        chunks, keys = [], []
        for row in rows:
            key = row_key(row)
            if key in self._index or key in keys:
                raise ValueError(f"id {key} already has a result in {self._partial}; each id is written once")
            chunks.append((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
            keys.append(key)
        data = b"".join(chunks)
        try:
            write_all(self._fd, data)
            fsync_file(self._fd)
        except (OSError, EnvironmentFailure) as exc:
            try:  # no torn line left behind for a resume in this same process
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            keep = f"finished results are kept: fix this and {self.rerun} to resume"
            if isinstance(exc, EnvironmentFailure):
                raise EnvironmentFailure(f"cannot append results to {self._partial}: {str(exc).removeprefix('cannot write: ')}"
                                         f"; {keep}") from None
            raise OSError(exc.errno, f"cannot append results to {self._partial}: {exc.strerror}; {keep}") from exc
        offset = self._size
        for key, chunk in zip(keys, chunks):
            self._index[key] = (offset, len(chunk))
            offset += len(chunk)
        self._size = offset

    def finish(self, order: Iterable[str]) -> None:
        """Write the output in `order` (id keys of every request of this run, input order), each
        id exactly once, atomically; then remove the progress files."""
        self._check_open()
        if self._complete_order is not None:
            if list(order) != self._complete_order:
                raise UserError(f"--output {str(self.output)!r} holds other ids than this run's input; "
                                f"pass --overwrite to start over")
        else:
            try:
                self._write_output(order)
            except EnvironmentFailure as exc:
                raise EnvironmentFailure(f"{exc}; finished results are kept: fix this and {self.rerun} to resume") from None
        # The progress file goes first: a record without a progress file then means "complete".
        self._partial.unlink(missing_ok=True)
        fsync_folder(self.output.absolute().parent)
        self._record.unlink(missing_ok=True)
        self.close()

    def _write_output(self, order: Iterable[str]) -> None:
        seen: set[str] = set()
        digest = hashlib.sha256()
        with atomic_output(self.output) as f:
            for key in order:
                if key in seen:
                    raise ValueError(f"id {key} appears twice in the order given to finish()")
                seen.add(key)
                where = self._index.get(key)
                if where is None:
                    raise ValueError(f"cannot finish {self.output}: id {key} has no result yet")
                offset, length = where
                line = os.pread(self._fd, length, offset)
                digest.update(line)
                f.write(line)
            extra = [key for key in self._index if key not in seen]
            if extra:
                raise ValueError(f"cannot finish {self.output}: {len(extra)} results are for ids not in "
                                 f"the order given (first: {extra[0]})")
            if self._made_by is not None:  # the output is whole in its temporary file: who made it, first
                made_by = {**self._made_by, "output_sha256": digest.hexdigest(), "results": len(seen)}
                write_atomic(provenance_path(self.output), (json.dumps(made_by, indent=1) + "\n").encode())

    def close(self) -> None:
        """Release the lock; the progress files stay for a later resume."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _check_open(self) -> None:
        if self._fd < 0:
            raise ValueError(f"the progress log of {self.output} is closed")

    def __enter__(self) -> "ResumeLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_for_resume(output_path: str | os.PathLike, identity: RunIdentity, *, overwrite: bool = False,
                    input_path: str | os.PathLike | None = None, stream: TextIO | None = None) -> ResumeLog | StdoutLog:
    """Open the output of a run: check the path, take the lock, and find what is finished.
    Call before the model loads (it refuses bad paths and mismatched runs at once)."""
    output = os.fspath(output_path)
    if output == STDOUT:
        log.warning("--output -: results are printed when the run ends; an interrupted run cannot resume "
                    "(give a file to --output to make it resumable)")
        return StdoutLog(stream or sys.stdout)
    out = Path(output)
    partial, record_path = progress_paths(out)
    # --overwrite would start over and discard what this run saves: resuming is the command without it
    rerun = "run the command again without --overwrite" if overwrite else "run the same command again"
    check_output_path(output, input_path=input_path, companions=(str(partial), str(record_path)))
    try:
        fd, created = open_nofollow(partial, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL), True
    except FileExistsError:
        fd, created = open_nofollow(partial, os.O_RDWR | os.O_APPEND), False
    try:
        _lock(fd, output, partial)
        folder = out.absolute().parent
        for name in (out.name, record_path.name):  # temporary files of a killed earlier run, by exact name
            remove_stale_temps(folder, name)
        fix = (f"restore it to resume, or pass --overwrite to start over (move {partial.name} aside first to keep "
               "its saved results)")
        recorded = None if overwrite else read_run_record(record_path, fix=fix)
        if recorded is None:
            if not overwrite and out.exists():
                keys = made_by_this_run(out, identity)  # else refused, saying why
                if created:
                    partial.unlink()
                log.info("%s is complete (%d results) and was made by this same run", output, len(keys))
                return ResumeLog(out, fd, dict.fromkeys(keys, (0, 0)), 0, 0, keys, rerun)
            if not overwrite and os.fstat(fd).st_size > 0:
                raise UserError(f"{str(partial)!r} holds results but {str(record_path)!r} (which run made them) is "
                                f"missing; pass --overwrite to start over")
            os.ftruncate(fd, 0)  # before the new record: old results never pass for the new run's
            fsync_file(fd, partial)
            started_at = int(time.time())
            with atomic_output(record_path) as f:
                f.write((json.dumps({**identity.record(), "started_at": started_at}, indent=1) + "\n").encode())
            return ResumeLog(out, fd, {}, 0, started_at, None, rerun)
        differences = identity.differences(recorded)
        if differences:
            raise UserError(f"cannot resume {output!r}: {'; '.join(differences)} from the unfinished run recorded in "
                            f"{str(record_path)!r}; rerun with the same settings to resume, or pass --overwrite to start over")
        started_at = int(recorded.get("started_at", 0))
        if created and out.exists():
            # Killed between finish()'s removals: OUT is whole. Tidy up now, so that the state is
            # that of any finished run whether or not this one gets to call finish().
            keys = output_keys(out)
            partial.unlink()
            record_path.unlink()
            fsync_folder(out.absolute().parent)
            log.info("%s is complete (%d results); nothing to resume", output, len(keys))
            return ResumeLog(out, fd, dict.fromkeys(keys, (0, 0)), 0, started_at, keys, rerun)
        index, size = _repair(fd, partial)
        log.info("resuming %s: %d results already finished", output, len(index))
        return ResumeLog(out, fd, index, size, started_at, None, rerun)
    except BaseException:
        os.close(fd)
        if created:
            partial.unlink(missing_ok=True)
        raise


def _lock(fd: int, output: str, partial: Path) -> None:
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"another process is writing --output {output!r} (its progress file {str(partial)!r} is "
                        f"locked); wait for it to end, or choose another --output") from None
    except OSError as exc:  # some network file systems have no locks
        log.warning("cannot lock %s (%s); make sure one process alone writes %s", partial, exc.strerror, output)


def _repair(fd: int, partial: Path) -> tuple[dict[str, tuple[int, int]], int]:
    """Index the progress file's complete lines and truncate what follows the last good one: a
    torn last line (killed mid-write), or anything after a line that does not parse."""
    index: dict[str, tuple[int, int]] = {}
    offset = 0
    damaged = False
    size = os.fstat(fd).st_size
    with open(os.dup(fd), "rb") as f:
        f.seek(0)
        for line_no, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                break
            try:
                row = json.loads(raw)
                key = row_key(row)
                if not _is_result(row):
                    raise ValueError("an id without its output")
            except (ValueError, KeyError, TypeError):
                if b"\0" not in raw and offset + len(raw) < size:  # results follow, and no zeros of a power loss:
                    # an edit, not a crash (which leaves a torn last line, or zeros in its last write)
                    raise UserError(f"{partial}:{line_no}: not a result line (an 'id' or 'custom_id' and the output); "
                                    f"the file was edited or damaged: delete or fix that line and rerun the same "
                                    f"command (the other results are kept), or pass --overwrite to start over") from None
                damaged = True
                break
            index.setdefault(key, (offset, len(raw)))
            offset += len(raw)
    if offset < size:
        report = log.warning if damaged else log.info
        report("%s: dropping %d bytes after the last complete result (%s); they are computed again",
               partial, size - offset, "a damaged line" if damaged else "a line cut by a crash")
        os.ftruncate(fd, offset)
        fsync_file(fd, partial)
    return index, offset


def _is_result(row: dict) -> bool:
    """The shape of a result line (outputs.py): native lines carry their token ids, OpenAI
    batch lines their response body; a line edited into another shape is not copied into OUT."""
    if "custom_id" in row:
        response = row.get("response")
        return isinstance(response, dict) and isinstance(response.get("body"), dict)
    ids = row.get("output_ids")
    return isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)


def _line_at(fd: int, offset: int) -> int:
    return os.pread(fd, offset, 0).count(b"\n") + 1


def made_by_this_run(out: Path, identity: RunIdentity) -> list[str]:
    """The id keys of a finished output that this same run made (its provenance names this
    identity and the output's bytes hash as recorded); else a UserError saying what differs."""
    output = str(out)
    replace = "pass --overwrite to replace it, or choose another file"
    made_by = read_run_record(provenance_path(out), fix=replace)
    if made_by is None:
        raise UserError(f"--output {output!r} already exists and no run of it is recorded; {replace}")
    differences = identity.differences(made_by)
    if differences:
        raise UserError(f"--output {output!r} was made by another run: {'; '.join(differences)} (recorded in "
                        f"{str(provenance_path(out))!r}); {replace}")
    digest = hashlib.sha256()
    with open(out, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if made_by.get("output_sha256") != digest.hexdigest():
        raise UserError(f"--output {output!r} changed since the run that made it finished (its content no longer "
                        f"matches {str(provenance_path(out))!r}); {replace}")
    return output_keys(out)


def output_keys(out: Path) -> list[str]:
    keys = []
    with open(out, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                keys.append(row_key(json.loads(raw)))
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{out}:{line_no}: not a result line of this program; pass --overwrite to start over") from None
    return keys
