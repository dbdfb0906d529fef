"""The verified offload folder: atomic, checked writes; reuse without rewriting or re-hashing;
corruption, stale entries, planted links, unsafe folders, leftovers and a full disk."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import stat
import subprocess
import time

import psutil
import pytest
import torch
from safetensors.torch import save_file

from flexgen_dist.errors import EnvironmentFailure, UserError
from flexgen_dist import files, temp_names
from flexgen_dist.files import check_offload_space
from flexgen_dist.storage import offload_dir, piece_hash
from flexgen_dist.storage.offload_dir import OffloadFolder
from flexgen_dist.storage.offload_identity import OffloadIdentity, checkpoint_identity
from flexgen_dist.storage.tiers import DiskIO, DiskReader, DiskTensor
from flexgen_dist.temp_names import TEMP_TAG, host_tag

IDENTITY = OffloadIdentity.of("test-source", storage_dtype=torch.float16)


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"model.layers.{i}.w": torch.randn(64, 32, generator=gen).half() for i in range(3)}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _stored(path) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.float16)


def _mtimes(folder) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def _write_all(where, tensors, **kw) -> OffloadFolder:
    folder = OffloadFolder(where, IDENTITY, **kw)
    for key, t in tensors.items():
        assert folder.trusted(key, _nbytes(t)) is None
        folder.write(key, t)
    folder.close()
    return folder


def test_reuse_rewrites_nothing_and_reads_nothing(tmp_path, monkeypatch):
    tensors = _tensors()
    first = _write_all(tmp_path, tensors)
    assert stat.S_IMODE(first.path.stat().st_mode) == 0o700
    before = _mtimes(first.path)
    assert len(before) == 2 * len(tensors) + 1  # data + entry per tensor, and identity.json

    def no_hashing(*args):
        raise AssertionError("a reused folder must not be re-hashed without verify")

    monkeypatch.setattr("flexgen_dist.storage.offload_dir.hash_file", no_hashing)
    with OffloadFolder(tmp_path, IDENTITY) as folder:
        assert folder.missing_bytes({k: _nbytes(t) for k, t in tensors.items()}) == 0
        for key, t in tensors.items():
            path = folder.trusted(key, _nbytes(t))
            assert path is not None and torch.equal(_read_back(path, t), t)
            assert folder.trusted(key, _nbytes(t) + 2) is None  # another size is another tensor
    assert _mtimes(first.path) == before


def _read_back(path, like: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(like)
    return DiskTensor(path, like.shape, like.dtype, DiskReader(DiskIO(threads=1), 1 << 16), create=False).read_into(out)


def test_same_size_corruption_is_found_by_verify_and_rebuilt(tmp_path):
    tensors = _tensors()
    _write_all(tmp_path, tensors)
    key, t = next(iter(tensors.items()))
    with OffloadFolder(tmp_path, IDENTITY) as folder:
        path = folder.file(key)
    st = path.stat()
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(raw)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    with OffloadFolder(tmp_path, IDENTITY) as folder:
        assert folder.trusted(key, _nbytes(t)) is None  # changed after its entry: caught without hashing
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime as recorded
    with OffloadFolder(tmp_path, IDENTITY) as folder:
        assert folder.trusted(key, _nbytes(t)) == path  # by design: no re-hash without verify
    with OffloadFolder(tmp_path, IDENTITY, verify=True) as folder:
        others = [k for k in tensors if k != key]
        assert all(folder.trusted(k, _nbytes(tensors[k])) is not None for k in others)
        assert folder.trusted(key, _nbytes(t)) is None
        folder.write(key, t)
    with OffloadFolder(tmp_path, IDENTITY, verify=True) as folder:
        assert folder.trusted(key, _nbytes(t)) == path
    assert torch.equal(_stored(path), t.reshape(-1))


def test_a_file_of_another_identity_is_not_trusted(tmp_path):
    key, t = next(iter(_tensors().items()))
    with OffloadFolder(tmp_path, IDENTITY) as folder:
        folder.write(key, t)
        src = folder.path
    other = OffloadIdentity.of("test-source", storage_dtype=torch.bfloat16)
    with OffloadFolder(tmp_path, other) as folder:
        for name in (f"{key}.bin", f"{key}.entry.json"):
            shutil.copy2(src / name, folder.path / name)  # keeps the mtime
        assert folder.trusted(key, _nbytes(t)) is None


def test_missing_entry_rebuilds_that_tensor_only(tmp_path):
    tensors = _tensors()
    first = _write_all(tmp_path, tensors)
    gone = list(tensors)[1]
    (first.path / f"{gone}.entry.json").unlink()  # as if killed between the data and the entry
    before = _mtimes(first.path)
    with OffloadFolder(tmp_path, IDENTITY) as folder:
        rebuilt = [k for k, t in tensors.items() if folder.trusted(k, _nbytes(t)) is None]
        assert rebuilt == [gone]
        folder.write(gone, tensors[gone])
        assert folder.trusted(gone, _nbytes(tensors[gone])) is not None
    after = _mtimes(first.path)
    changed = {name for name in after if after[name] != before.get(name)}
    assert changed == {f"{gone}.bin", f"{gone}.entry.json"}


def test_checkpoint_identity_follows_headers_sizes_mtimes_dtype_and_compression(tmp_path):
    a, b = tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors"
    a.parent.mkdir()
    b.parent.mkdir()
    save_file({"w": torch.zeros(4, 4)}, a)
    save_file({"w": torch.zeros(2, 8)}, b)  # another tensor, same name and file size
    assert a.stat().st_size == b.stat().st_size
    mtime = a.stat().st_mtime_ns
    os.utime(b, ns=(mtime, mtime))

    def ident(path, **kw):
        return checkpoint_identity([path], **{"storage_dtype": torch.float16, **kw})

    assert ident(a) == ident(a)
    assert ident(a).folder_name != ident(b).folder_name
    assert ident(a, storage_dtype="float16") == ident(a)
    assert ident(a, storage_dtype=torch.bfloat16).folder_name != ident(a).folder_name
    quant = {"bits": 4, "group_size": 64}
    assert ident(a, compression=quant).folder_name != ident(a).folder_name
    assert ident(a, compression=quant) == ident(a, compression={"group_size": 64, "bits": 4})
    os.utime(a, ns=(mtime, mtime + 1))
    assert ident(a).folder_name != ident(b).folder_name
    os.utime(b, ns=(mtime, mtime + 1))
    assert ident(a).source != ident(b).source  # only the header differs now
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(UserError, match="not a safetensors file"):
        ident(bad)


def test_planted_links_are_never_followed(tmp_path, monkeypatch):
    key, t = next(iter(_tensors().items()))
    outside = tmp_path / "outside"
    outside.mkdir()
    targets = {name: outside / name for name in ("data", "entry", "temp")}
    for target in targets.values():
        target.write_bytes(b"not yours")
    offload = tmp_path / "offload"
    with OffloadFolder(offload, IDENTITY) as folder:
        path = folder.path
    predicted = f".{key}.bin.{TEMP_TAG}.{host_tag()}.{os.getpid()}.0123456789abcdef"
    (path / f"{key}.bin").symlink_to(targets["data"])
    (path / f"{key}.entry.json").symlink_to(targets["entry"])
    (path / predicted).symlink_to(targets["temp"])
    names = iter([predicted])
    real_temp_name = files.temp_name
    monkeypatch.setattr(files, "temp_name", lambda name: next(names, None) or real_temp_name(name))
    monkeypatch.setattr("flexgen_dist.storage.offload_dir.remove_stale_temps", lambda dir_fd: [])  # keep the planted name
    with OffloadFolder(offload, IDENTITY) as folder:
        assert folder.trusted(key, _nbytes(t)) is None
        folder.write(key, t)  # its first temporary name is the planted link: taken, so another
        assert folder.trusted(key, _nbytes(t)) == path / f"{key}.bin"
    assert all(target.read_bytes() == b"not yours" for target in targets.values())
    assert not (path / f"{key}.bin").is_symlink() and torch.equal(_stored(path / f"{key}.bin"), t.reshape(-1))


def test_a_link_in_place_of_the_folder_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    offload = tmp_path / "offload"
    offload.mkdir()
    (offload / IDENTITY.folder_name).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UserError, match="symbolic link") as info:
        OffloadFolder(offload, IDENTITY)
    assert "\n" not in str(info.value)
    assert list(elsewhere.iterdir()) == []


def test_a_group_writable_folder_is_refused(tmp_path):
    path = _write_all(tmp_path, {}).path
    path.chmod(0o770)
    with pytest.raises(UserError, match="writable by group or others.*chmod go-w"):
        OffloadFolder(tmp_path, IDENTITY)
    path.chmod(0o700)
    OffloadFolder(tmp_path, IDENTITY).close()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_a_folder_of_another_user_is_refused(tmp_path):
    path = _write_all(tmp_path, {}).path
    os.chown(path, 65534, 65534)
    with pytest.raises(UserError, match="owned by uid 65534") as info:
        OffloadFolder(tmp_path, IDENTITY)
    assert "\n" not in str(info.value)


def test_leftovers_of_dead_writers_are_removed(tmp_path):
    path = _write_all(tmp_path, {}).path
    dead = subprocess.Popen(["true"])
    dead.wait()
    if psutil.pid_exists(dead.pid):
        pytest.skip("the pid of the finished child was reused already")
    host, me = host_tag(), os.getpid()
    old = psutil.Process(me).create_time() - 3600
    names = {
        "dead": f".a.bin.{TEMP_TAG}.{host}.{dead.pid}.{'1' * 16}",
        "reused_pid": f".b.entry.json.{TEMP_TAG}.{host}.{me}.{'2' * 16}",  # our pid, written before we started
        "live": f".c.bin.{TEMP_TAG}.{host}.{me}.{'3' * 16}",
        "foreign_recent": f".d.bin.{TEMP_TAG}.otherhost.12.{'4' * 16}",
        "foreign_stale": f".e.bin.{TEMP_TAG}.otherhost.12.{'5' * 16}",
        "not_temp": "notes.txt",
        "old_scheme": f"tmp.{host}.{dead.pid}.aa01",  # not this version's pattern: kept
    }
    for name in names.values():
        (path / name).write_bytes(b"x" * 1000)
    os.utime(path / names["reused_pid"], (old, old))
    stale = time.time() - temp_names.FOREIGN_STALE_S - 3600
    os.utime(path / names["foreign_stale"], (stale, stale))
    link_target = tmp_path / "target"
    link_target.write_bytes(b"keep")
    (path / f".f.bin.{TEMP_TAG}.{host}.{dead.pid}.{'6' * 16}").symlink_to(link_target)  # a planted link
    OffloadFolder(tmp_path, IDENTITY).close()
    left = {p.name for p in path.iterdir()}
    assert left == {"identity.json", names["live"], names["foreign_recent"], names["not_temp"], names["old_scheme"]}
    assert link_target.read_bytes() == b"keep"


def test_short_writes_are_continued(tmp_path, monkeypatch):
    real_write = os.write
    calls = []

    def short_write(fd, data):
        calls.append(len(data))
        return real_write(fd, bytes(data[: max(1, len(data) // 3)]))

    monkeypatch.setattr(os, "write", short_write)
    monkeypatch.setattr(piece_hash, "PIECE_BYTES", 1000)  # several pieces: the threaded hash path
    key, t = next(iter(_tensors().items()))
    with OffloadFolder(tmp_path, IDENTITY) as folder:
        path = folder.write(key, t)
    monkeypatch.setattr(os, "write", real_write)
    assert len(calls) > _nbytes(t) // 1000  # more calls than pieces: short writes happened
    assert torch.equal(_stored(path), t.reshape(-1))
    real_readv = os.readv
    monkeypatch.setattr(os, "readv", lambda fd, buffers: real_readv(fd, [buffers[0][:7]]))  # short reads
    with OffloadFolder(tmp_path, IDENTITY, verify=True) as folder:
        assert folder.trusted(key, _nbytes(t)) == path  # the checksum taken while writing is right


def test_an_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    key, t = next(iter(_tensors().items()))
    real_write = os.write

    def interrupted(fd, data):
        real_write(fd, bytes(data[:10]))
        raise KeyboardInterrupt

    with OffloadFolder(tmp_path, IDENTITY) as folder:
        monkeypatch.setattr(os, "write", interrupted)
        with pytest.raises(KeyboardInterrupt):
            folder.write(key, t)
        monkeypatch.setattr(os, "write", real_write)
        assert {p.name for p in folder.path.iterdir()} == {"identity.json"}
        assert folder.trusted(key, _nbytes(t)) is None


@pytest.fixture
def small_tmpfs(tmp_path, request):
    """A 1 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    request.addfinalizer(lambda: subprocess.run(["umount", str(mount_point)], check=False))
    return mount_point


def _remount(mount_point, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mount_point)], check=True)


def test_a_full_disk_is_one_line_and_leaves_no_file(small_tmpfs):
    big = torch.randn(512 * 1024, generator=torch.Generator().manual_seed(1))  # 2 MiB on 1 MiB
    with OffloadFolder(small_tmpfs, IDENTITY) as folder:
        with pytest.raises(EnvironmentFailure, match="the disk is full") as info:
            folder.write("big.w", big)
        assert "\n" not in str(info.value)
        assert {p.name for p in folder.path.iterdir()} == {"identity.json"}
    _remount(small_tmpfs, "size=8m")
    with OffloadFolder(small_tmpfs, IDENTITY) as folder:
        assert folder.trusted("big.w", _nbytes(big)) is None
        path = folder.write("big.w", big)
        assert folder.trusted("big.w", _nbytes(big)) == path
    assert torch.equal(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.float32), big)


def test_check_offload_space(tmp_path, small_tmpfs):
    check_offload_space(tmp_path / "new" / "folder", 0)
    assert (tmp_path / "new" / "folder").is_dir()
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(UserError, match="is not a folder"):
        check_offload_space(a_file, 0)
    with pytest.raises(UserError, match="cannot be created"):
        check_offload_space(a_file / "below", 0)
    check_offload_space(small_tmpfs, 512 * 1024)
    with pytest.raises(UserError, match=r"1.00 MiB free but this run writes 2.00 MiB there \(1048576 < 2097152 bytes\)") as info:
        check_offload_space(small_tmpfs, 2 << 20)
    assert "\n" not in str(info.value)
    _remount(small_tmpfs, "ro")
    with pytest.raises(UserError, match="is not writable"):
        check_offload_space(small_tmpfs, 0)
    assert list(small_tmpfs.iterdir()) == []  # the probe is gone


@pytest.mark.parametrize("size", [0, 999, 1000, 3500])
def test_piece_hash_is_its_definition_whether_written_or_read(tmp_path, monkeypatch, size):
    monkeypatch.setattr(piece_hash, "PIECE_BYTES", 1000)
    data = os.urandom(size)
    by_hand = hashlib.sha256(b"".join(hashlib.sha256(data[i : i + 1000]).digest() for i in range(0, size, 1000))).hexdigest()
    dir_fd = os.open(tmp_path, os.O_RDONLY)
    try:
        written = offload_dir.write_file(dir_fd, "f.bin", memoryview(data), tmp_path)
        assert (written.size, written.digest) == (size, by_hand)
        assert piece_hash.hash_file(dir_fd, "f.bin") == (size, by_hand)
    finally:
        os.close(dir_fd)
    assert (tmp_path / "f.bin").read_bytes() == data and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def _rank_writes(where, keys: list[str]) -> None:
    with OffloadFolder(where, IDENTITY) as folder:
        for key in keys:
            folder.write(key, _value(key))


def _value(key: str) -> torch.Tensor:
    return torch.full((256 * 1024,), float(sum(key.encode())), dtype=torch.float16)  # 512 KiB


def test_ranks_write_their_layers_into_one_folder_at_once(tmp_path):
    """Three processes create the folder and write at once (one key shared, as tied embeddings
    may be): every process's keys are trusted afterwards, nothing temporary is left."""
    own = {rank: [f"model.layers.{rank}.{name}" for name in ("q", "k", "v", "o")] for rank in range(3)}
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank_writes, args=(tmp_path, [*keys, "model.embed"])) for keys in own.values()]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    assert [proc.exitcode for proc in procs] == [0, 0, 0]
    with OffloadFolder(tmp_path, IDENTITY, verify=True) as folder:
        for key in [k for keys in own.values() for k in keys]:
            path = folder.trusted(key, _nbytes(_value(key)))
            assert path is not None and torch.equal(_stored(path), _value(key))
        shared = folder.trusted("model.embed", _nbytes(_value("model.embed")))
        assert shared is None or torch.equal(_stored(shared), _value("model.embed"))  # a race may leave it untrusted
        assert not [p.name for p in folder.path.iterdir() if TEMP_TAG in p.name]


def test_a_data_file_whose_entry_failed_is_removed(tmp_path, monkeypatch):
    key, t = next(iter(_tensors().items()))
    real_write_file = offload_dir.write_file

    def entry_fails(dir_fd, name, data, where):
        if name.endswith(".entry.json"):
            raise EnvironmentFailure("disk full (simulated)")
        return real_write_file(dir_fd, name, data, where)

    with OffloadFolder(tmp_path, IDENTITY) as folder:
        monkeypatch.setattr(offload_dir, "write_file", entry_fails)
        with pytest.raises(EnvironmentFailure):
            folder.write(key, t)
        assert {p.name for p in folder.path.iterdir()} == {"identity.json"}


def test_weight_folders_of_vanished_or_changed_checkpoints_are_found_and_only_they(tmp_path):
    """A folder's identity note names its checkpoint's files: a folder whose checkpoint was
    deleted, or saved over since, is stale; the live one, the one being used and folders this
    tool did not note are not, and removing a stale one leaves the others whole."""
    off = tmp_path / "off"
    made = {}
    for name in ("gone", "changed", "live", "used"):
        path = tmp_path / name / "model.safetensors"
        path.parent.mkdir()
        save_file({"w": torch.ones(4, 4)}, path)
        identity = checkpoint_identity([path], storage_dtype=torch.float16)
        with OffloadFolder(off, identity, weight_files=[path]) as folder:
            folder.write("w", torch.ones(4, 4, dtype=torch.float16))
        made[name] = (path, folder.path)
    with OffloadFolder(off, OffloadIdentity.of("random-seed0", storage_dtype="float16")) as unnoted:
        unnoted.write("w", torch.ones(2, dtype=torch.float16))
    made["gone"][0].unlink()
    save_file({"w": torch.zeros(8, 2)}, made["changed"][0])  # saved over: another header
    stale = offload_dir.stale_folders(off, keep=made["used"][1].name)
    assert {s.path for s in stale} == {made["gone"][1], made["changed"][1]}
    why = {s.path: s.why for s in stale}
    assert why[made["gone"][1]] == f"its checkpoint file {made['gone'][0]} no longer exists"
    assert why[made["changed"][1]].endswith("has changed since")
    assert all(s.nbytes > 32 for s in stale)  # the tensor and its entry, at least
    for s in stale:
        offload_dir.remove_folder(s)
    assert sorted(p.name for p in off.iterdir()) == sorted([made["live"][1].name, made["used"][1].name, unnoted.path.name])
    assert offload_dir.stale_folders(off, keep="") == []
