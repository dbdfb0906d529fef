"""Hardware description: JSON, the T4 preset, per-rank shares and overrides; capacity detection
(cgroup v1/v2 against fake trees, NVML device mapping against a fake pynvml); the profiler."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import psutil
import pytest

from flexgen_dist.errors import EnvironmentFailure, UserError
from flexgen_dist.machine import detect
from flexgen_dist.machine.hardware import (
    SCHEMA_VERSION,
    Capacities,
    Hardware,
    MemoryLimit,
    Speeds,
    apply_overrides,
    rank_share,
)
from flexgen_dist.machine.presets import FLEXGEN_T4, hardware_from_arg

REPO = Path(__file__).resolve().parents[1]
GiB = 1 << 30


def cpu_machine(ram=64 * GiB, disk=1000 * GiB) -> Hardware:
    speeds = dataclasses.replace(FLEXGEN_T4.speeds, compute_dtype="float32")
    return Hardware(name="test cpu", capacities=Capacities(has_gpu=False, gpu_mem=ram, cpu_mem=ram, host_mem=ram,
                                                            disk_mem=disk), speeds=speeds)


# --- JSON ---------------------------------------------------------------------------------------


def test_json_round_trip(tmp_path):
    path = tmp_path / "t4.json"
    FLEXGEN_T4.save(path)
    assert Hardware.load(path) == FLEXGEN_T4
    machine = cpu_machine()
    machine.save(path)
    assert Hardware.load(path) == machine


def _written(tmp_path, edit) -> Path:
    data = FLEXGEN_T4.to_dict()
    edit(data)
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["speeds"].update(h2d_bw=-1.0), "speeds.h2d_bw"),
    (lambda d: d["speeds"].update(matmul_flops="fast"), "speeds.matmul_flops"),
    (lambda d: d["speeds"].update(compute_dtype="float8"), "speeds.compute_dtype"),
    (lambda d: d["speeds"].pop("disk_read_bw"), "speeds.disk_read_bw"),
    (lambda d: d["capacities"].update(gpu_mem=-5), "capacities.gpu_mem"),
    (lambda d: d["capacities"].update(cpu_mem="lots"), "capacities.cpu_mem"),
    (lambda d: d["capacities"].update(has_gpu="yes"), "capacities.has_gpu"),
    (lambda d: d["capacities"].update(gpu_memory=1), "capacities.gpu_memory"),
    (lambda d: d.update(schema_version=SCHEMA_VERSION + 1), "schema_version"),
    (lambda d: d.pop("speeds"), "speeds"),
])
def test_bad_file_names_file_and_field(tmp_path, edit, field):
    path = _written(tmp_path, edit)
    with pytest.raises(UserError) as info:
        Hardware.load(path)
    message = str(info.value)
    assert str(path) in message and f"field {field} " in message and "\n" not in message


def test_sizes_in_a_hand_written_file(tmp_path):
    path = _written(tmp_path, lambda d: d["capacities"].update(gpu_mem="24G", disk_mem=2.0e12))
    caps = Hardware.load(path).capacities
    assert (caps.gpu_mem, caps.disk_mem) == (24 * GiB, 2 * 10**12)


def test_not_json_names_the_line(tmp_path):
    path = tmp_path / "hw.json"
    path.write_text('{\n  "schema_version": 1,\n  oops\n}')
    with pytest.raises(UserError, match=rf"{path}:3: not valid JSON"):
        Hardware.load(path)


def test_hardware_arg_preset_file_or_error(tmp_path):
    assert hardware_from_arg("flexgen-t4") is FLEXGEN_T4
    FLEXGEN_T4.save(tmp_path / "t4.json")
    assert hardware_from_arg(tmp_path / "t4.json") == FLEXGEN_T4
    with pytest.raises(UserError, match="not a preset name"):
        hardware_from_arg(tmp_path / "absent.json")


# --- the T4 preset ------------------------------------------------------------------------------


def test_t4_preset_is_flexgens_cost_model():
    GB, T = 1 << 30, 1e12  # flexgen/utils.py
    c, s = FLEXGEN_T4.capacities, FLEXGEN_T4.speeds
    assert c.has_gpu and (c.gpu_mem, c.cpu_mem, c.disk_mem) == (16 * GB, 208 * GB, 1500 * GB)
    assert (s.h2d_bw, s.d2h_bw, s.disk_read_bw, s.disk_write_bw) == (12.89 * GB, 4.82 * GB, 0.473 * GB, 2.015 * GB)
    assert (s.matmul_flops, s.decode_matmul_flops) == (21.24 * T, 4.3 * T)
    assert (s.attention_flops, s.decode_attention_flops, s.cpu_attention_flops) == (9.97 * T, 0.079 * T, 0.0123 * T)
    assert s.compute_dtype == "float16"


def test_memory_limits_gpu_and_cpu_only():
    t4 = FLEXGEN_T4.memory_limits()
    assert MemoryLimit(("gpu",), 16 * GiB) in t4 and MemoryLimit(("cpu",), 208 * GiB) in t4
    assert all("gpu" not in limit.tiers or limit.tiers == ("gpu",) for limit in t4)
    cpu = cpu_machine(ram=10 * GiB).memory_limits()
    assert MemoryLimit(("gpu", "cpu"), 10 * GiB) in cpu  # one pool of host RAM for both tiers


# --- per-rank shares and overrides --------------------------------------------------------------


def test_rank_share_divides_node_resources_not_the_gpu():
    share = rank_share(FLEXGEN_T4, local_world_size=4)
    c, s = share.capacities, share.speeds
    assert c.gpu_mem == 16 * GiB  # each rank its own GPU
    assert (c.cpu_mem, c.host_mem, c.disk_mem) == (52 * GiB, 52 * GiB, 375 * GiB)
    assert s.disk_read_bw == pytest.approx(FLEXGEN_T4.speeds.disk_read_bw / 4)
    assert s.cpu_attention_flops == pytest.approx(FLEXGEN_T4.speeds.cpu_attention_flops / 4)
    assert s.matmul_flops == FLEXGEN_T4.speeds.matmul_flops and s.h2d_bw == FLEXGEN_T4.speeds.h2d_bw
    assert rank_share(FLEXGEN_T4, local_world_size=1) is FLEXGEN_T4


def test_rank_share_of_a_shared_gpu():
    share = rank_share(FLEXGEN_T4, local_world_size=4, ranks_per_gpu=2)
    assert share.capacities.gpu_mem == 8 * GiB and share.capacities.cpu_mem == 52 * GiB
    assert share.speeds.matmul_flops == pytest.approx(FLEXGEN_T4.speeds.matmul_flops / 2)


def test_rank_share_without_gpu_divides_the_gpu_tier_too():
    share = rank_share(cpu_machine(ram=64 * GiB), local_world_size=2)
    assert share.capacities.gpu_mem == share.capacities.cpu_mem == share.capacities.host_mem == 32 * GiB
    assert share.speeds.matmul_flops == pytest.approx(FLEXGEN_T4.speeds.matmul_flops / 2)
    with pytest.raises(UserError):
        rank_share(FLEXGEN_T4, local_world_size=0)


def test_overrides_with_a_gpu():
    hw = apply_overrides(FLEXGEN_T4, gpu_mem=8 * GiB, cpu_mem=32 * GiB, disk_mem=100 * GiB)
    c = hw.capacities
    assert (c.gpu_mem, c.cpu_mem, c.host_mem, c.disk_mem) == (8 * GiB, 32 * GiB, 32 * GiB, 100 * GiB)
    assert apply_overrides(FLEXGEN_T4) is FLEXGEN_T4
    assert apply_overrides(FLEXGEN_T4, disk_mem=0).capacities.disk_mem == 0


def test_overrides_after_share_are_per_rank():
    hw = apply_overrides(rank_share(FLEXGEN_T4, local_world_size=4), cpu_mem=100 * GiB)
    assert hw.capacities.cpu_mem == 100 * GiB and hw.capacities.disk_mem == 375 * GiB


def test_overrides_without_gpu_split_host_ram():
    machine = cpu_machine(ram=20 * GiB)
    both = apply_overrides(machine, gpu_mem=300 << 20, cpu_mem=0).capacities
    assert (both.gpu_mem, both.cpu_mem, both.host_mem) == (300 << 20, 0, 300 << 20)
    one = apply_overrides(machine, gpu_mem=2 * GiB).capacities
    assert (one.gpu_mem, one.cpu_mem, one.host_mem) == (2 * GiB, 20 * GiB, 20 * GiB)
    above = apply_overrides(machine, cpu_mem=30 * GiB).capacities
    assert above.host_mem == 30 * GiB  # explicit wins over detection
    with pytest.raises(UserError):
        apply_overrides(machine, cpu_mem=-1)


# --- cgroups against fake trees -----------------------------------------------------------------


def fake_proc(root: Path, cgroup_lines: list[str], mount_lines: list[str]) -> None:
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text("\n".join(cgroup_lines) + "\n")
    (root / "proc/self/mountinfo").write_text("\n".join(mount_lines) + "\n")


def group(root: Path, path: str, **files: str) -> Path:
    folder = root / path.lstrip("/")
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text + "\n")
    return folder


V2_MOUNT = "41 31 0:38 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate"
V1_MOUNT = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory"


def test_v2_limit_of_own_group(tmp_path):
    fake_proc(tmp_path, ["0::/job/step"], [V2_MOUNT])
    group(tmp_path, "/sys/fs/cgroup/job", memory__max="max")
    leaf = group(tmp_path, "/sys/fs/cgroup/job/step", memory__max=str(8 * GiB), memory__current=str(3 * GiB),
                 memory__stat=f"anon 100\ninactive_file {GiB}\nactive_file 5")
    found = detect.cgroup_memory(tmp_path)
    assert (found.version, found.group, found.limit) == (2, leaf, 8 * GiB)
    assert found.headroom == 8 * GiB - 2 * GiB  # inactive file cache is reclaimable


def test_v2_max_walks_up_to_a_limited_parent(tmp_path):
    fake_proc(tmp_path, ["0::/a/b/c"], [V2_MOUNT])
    parent = group(tmp_path, "/sys/fs/cgroup/a", memory__max=str(4 * GiB), memory__current=str(GiB))
    group(tmp_path, "/sys/fs/cgroup/a/b", memory__max="max", memory__current="0")
    group(tmp_path, "/sys/fs/cgroup/a/b/c", memory__max="max", memory__current="0")
    found = detect.cgroup_memory(tmp_path)
    assert found.group == parent and found.headroom == 3 * GiB


def test_v2_memory_high_counts_and_unlimited_is_none(tmp_path):
    fake_proc(tmp_path, ["0::/g"], [V2_MOUNT])
    group(tmp_path, "/sys/fs/cgroup/g", memory__max="max", memory__high=str(2 * GiB), memory__current="0")
    assert detect.cgroup_memory(tmp_path).limit == 2 * GiB
    group(tmp_path, "/sys/fs/cgroup/g", memory__high="max")
    assert detect.cgroup_memory(tmp_path) is None


def test_v1_limit_and_unlimited_sentinel(tmp_path):
    fake_proc(tmp_path, ["9:name=systemd:/", "4:memory:/docker/abc", "0::/"], [V1_MOUNT])
    group(tmp_path, "/sys/fs/cgroup/memory", memory__limit_in_bytes="9223372036854771712")
    leaf = group(tmp_path, "/sys/fs/cgroup/memory/docker/abc", memory__limit_in_bytes="9223372036854771712",
                 memory__usage_in_bytes="1000")
    assert detect.cgroup_memory(tmp_path) is None
    group(tmp_path, "/sys/fs/cgroup/memory/docker/abc", memory__limit_in_bytes=str(6 * GiB),
          memory__usage_in_bytes=str(2 * GiB), memory__stat=f"inactive_file 1\ntotal_inactive_file {GiB}")
    found = detect.cgroup_memory(tmp_path)
    assert (found.version, found.group, found.headroom) == (1, leaf, 5 * GiB)


def test_v1_mount_of_a_subtree(tmp_path):
    """A container without a cgroup namespace: its own group is mounted as the hierarchy's root."""
    mount = "35 31 0:32 /docker/abc /sys/fs/cgroup/memory ro,relatime - cgroup cgroup rw,memory"
    fake_proc(tmp_path, ["4:memory:/docker/abc"], [mount])
    mounted = group(tmp_path, "/sys/fs/cgroup/memory", memory__limit_in_bytes=str(3 * GiB),
                    memory__usage_in_bytes="0")
    found = detect.cgroup_memory(tmp_path)
    assert found.group == mounted and found.limit == 3 * GiB


def test_hybrid_takes_the_least_headroom(tmp_path):
    fake_proc(tmp_path, ["4:memory:/x", "0::/y"], [V1_MOUNT, V2_MOUNT.replace("/sys/fs/cgroup ", "/sys/fs/cgroup/unified ")])
    group(tmp_path, "/sys/fs/cgroup/memory/x", memory__limit_in_bytes=str(6 * GiB), memory__usage_in_bytes="0")
    group(tmp_path, "/sys/fs/cgroup/unified/y", memory__max=str(5 * GiB), memory__current=str(2 * GiB))
    found = detect.cgroup_memory(tmp_path)
    assert (found.version, found.headroom) == (2, 3 * GiB)


def test_no_cgroup_files_means_no_limit(tmp_path):
    assert detect.cgroup_memory(tmp_path) is None


def test_host_memory_is_capped_by_the_cgroup(tmp_path):
    fake_proc(tmp_path, ["0::/small"], [V2_MOUNT])
    group(tmp_path, "/sys/fs/cgroup/small", memory__max=str(4 << 30), memory__current=str(1 << 30))
    usable, found = detect.host_memory(tmp_path)
    # the headroom (3 GiB) less the page cache's reserve (an eighth of the limit)
    assert usable == (3 << 30) - (512 << 20) and found.limit == 4 << 30


# --- detection on this machine and GPU mapping --------------------------------------------------


def test_detect_on_this_machine(tmp_path):
    caps = detect.detect_capacities("cpu", tmp_path / "not" / "yet")
    assert not caps.has_gpu and caps.cpu_mem > 0 and caps.disk_mem > 0
    assert caps.cpu_mem <= psutil.virtual_memory().total
    assert caps.gpu_mem == caps.cpu_mem == caps.host_mem


@pytest.fixture
def fake_nvml(monkeypatch):
    module = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    free = {("index", 0): 10, ("index", 1): 11, ("index", 5): 15, ("uuid", "GPU-abc"): 77}
    module.NVMLError = NVMLError
    module.nvmlInit = lambda: None
    module.nvmlShutdown = lambda: None
    module.nvmlDeviceGetHandleByIndex = lambda i: ("index", i)
    module.nvmlDeviceGetHandleByUUID = lambda u: ("uuid", u)
    module.nvmlDeviceGetName = lambda h: b"Fake GPU"
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(free=free[h], total=100)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    monkeypatch.setattr(detect, "_torch_free", lambda index: None)


def test_cuda_index_maps_through_visible_devices(fake_nvml):
    assert detect.gpu_memory(1, environ={}) == (11, "Fake GPU")
    assert detect.gpu_memory(1, environ={"CUDA_VISIBLE_DEVICES": "3,5"}) == (15, "Fake GPU")
    assert detect.gpu_memory(0, environ={"CUDA_VISIBLE_DEVICES": "GPU-abc"}) == (77, "Fake GPU")
    assert detect.gpu_memory(0, environ={"CUDA_VISIBLE_DEVICES": ""}) is None
    assert detect.gpu_memory(2, environ={"CUDA_VISIBLE_DEVICES": "0,1"}) is None


def test_detect_cuda_with_fake_nvml(fake_nvml, tmp_path):
    caps = detect.detect_capacities("cuda:5", tmp_path, environ={})
    assert caps.has_gpu and caps.gpu_mem == 15 and caps.cpu_mem > 0
    with pytest.raises(UserError, match="no GPU"):
        detect.detect_capacities("cuda:0", tmp_path, environ={"CUDA_VISIBLE_DEVICES": "-1"})
    with pytest.raises(UserError, match="not cpu, cuda or cuda:N"):
        detect.detect_capacities("tpu", tmp_path)


# --- purity -------------------------------------------------------------------------------------


def test_planning_modules_import_without_torch():
    """planning/, spec/ and machine/'s detection and profiles must not need torch;
    flexgen_dist/__init__ imports torch, so bypass it."""
    modules = sorted(f"flexgen_dist.{package}.{p.stem}" for package in ("planning", "spec")
                     for p in (REPO / "flexgen_dist" / package).glob("*.py") if p.stem != "__init__")
    code = f"""
import sys, types
sys.modules["torch"] = None  # any import of torch now fails
for name in ("flexgen_dist", "flexgen_dist.planning", "flexgen_dist.spec", "flexgen_dist.machine"):
    package = types.ModuleType(name)
    package.__path__ = [{str(REPO)!r} + "/" + name.replace(".", "/")]
    sys.modules[name] = package
import importlib
for module in ("hardware", "presets", "detect", "cgroups"):
    importlib.import_module("flexgen_dist.machine." + module)
for module in {modules!r}:
    importlib.import_module(module)
assert sys.modules["flexgen_dist.machine.presets"].FLEXGEN_T4.capacities.has_gpu
sys.modules["flexgen_dist.machine.detect"].detect_capacities("cpu", ".")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# --- the profiler -------------------------------------------------------------------------------


def test_profiler_quick_writes_a_loadable_profile(tmp_path):
    out = tmp_path / "hw.json"
    (tmp_path / "offload").mkdir()  # the folder to measure must exist (a typo is an error, not a new folder)
    env = {**os.environ, "PYTHONPATH": str(REPO), "FLEXGEN_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "flexgen_dist.profile", "--device", "cpu", "--quick", "--out", str(out),
         "--offload-dir", str(tmp_path / "offload")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    hw = Hardware.load(out)  # validated: every speed a positive number
    assert hw.speeds.compute_dtype == "float32" and not hw.capacities.has_gpu
    assert "disk read" in proc.stdout and str(out) in proc.stdout
    assert not (tmp_path / "cache").exists()  # --out, not the cache
    assert not any((tmp_path / "offload").iterdir())  # the disk test file is gone


def _plant_link(d):
    (d / "victim.txt").write_text("precious\n")
    (d / "hw.json").symlink_to(d / "victim.txt")


@pytest.mark.parametrize("args, setup, fragment", [
    (["--offload-dir", "nope/deeper"], None, "--offload-dir nope/deeper does not exist; create it"),
    (["--offload-dir", "f"], lambda d: (d / "f").write_text("precious\n"), "--offload-dir f is not a folder"),
    (["--out", "no/such/hw.json"], None, "cannot write --out 'no/such/hw.json': folder"),
    (["--out", "hw"], lambda d: (d / "hw").mkdir(), "--out 'hw' is a folder; refusing to write there"),
    (["--out", "hw.json"], _plant_link, "--out 'hw.json' is a symbolic link; refusing to write there"),
    (["--out", "-"], None, "--out -: standard output is not possible here"),
])
def test_profiler_refuses_bad_paths_in_one_line_before_measuring(tmp_path, monkeypatch, capsys, args, setup, fragment):
    from flexgen_dist import profile

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLEXGEN_CACHE_DIR", str(tmp_path / "cache"))
    if setup is not None:
        setup(tmp_path)
    before = {p.name: (p.read_bytes() if p.is_file() else None) for p in tmp_path.iterdir()}

    def measured(*a, **k):
        raise AssertionError("measured before the paths were checked")

    monkeypatch.setattr(profile, "profile_machine", measured)
    assert profile.main(["--device", "cpu", "--quick", *args]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and err.startswith("error: ") and fragment in err, err
    assert {p.name: (p.read_bytes() if p.is_file() else None) for p in tmp_path.iterdir()} == before


def test_the_runs_offload_folder_is_checked_before_its_disk_is_profiled(tmp_path, monkeypatch, caplog):
    from flexgen_dist import profile

    calls = []

    def load_or_profile(device, folder, **kwargs):
        calls.append(str(folder))
        if str(folder) == str(tmp_path / "small"):
            raise UserError(f"{folder} has only 1.00 MiB free, too little to measure its disk")
        return cpu_machine()

    monkeypatch.setattr(profile, "load_or_profile", load_or_profile)
    (tmp_path / "f").write_text("precious\n")
    with pytest.raises(UserError, match="is not a folder"):
        profile.machine_hardware("cpu", tmp_path / "f")
    with pytest.raises(UserError, match="is not a folder"):
        profile.machine_hardware("cpu", "/dev/null")
    assert calls == []  # refused before any profile was loaded or measured
    (tmp_path / "small").mkdir()
    with caplog.at_level(logging.INFO):
        machine = profile.machine_hardware("cpu", tmp_path / "small")
    assert calls == [str(tmp_path / "small"), tempfile.gettempdir()]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # the run's own check speaks, if any
    assert any("could not be measured" in note for note in machine.notes)


def test_load_or_profile_uses_the_cache_or_says_how(tmp_path):
    from flexgen_dist import profile

    environ = {"FLEXGEN_CACHE_DIR": str(tmp_path)}
    with pytest.raises(UserError, match="python -m flexgen_dist.profile --device cpu"):
        profile.load_or_profile("cpu", tmp_path, profile_if_missing=False, environ=environ)
    path = profile.cache_path("cpu", "float32", tmp_path, environ=environ)
    assert path.parent == tmp_path
    machine = cpu_machine()
    machine.save(path)
    assert profile.load_or_profile("cpu", tmp_path, profile_if_missing=False, environ=environ) == machine
    path.write_text("{}")
    with pytest.raises(UserError, match="field schema_version"):
        profile.load_or_profile("cpu", tmp_path, profile_if_missing=False, environ=environ)


@pytest.mark.parametrize("where", ["a file", "read-only"])
def test_a_cache_that_cannot_be_written_is_a_warning(tmp_path, monkeypatch, caplog, where):
    """A read-only HOME or FLEXGEN_CACHE_DIR naming a file: the measured profile is used, not cached."""
    from flexgen_dist import profile

    machine = cpu_machine()
    monkeypatch.setattr(profile, "profile_machine", lambda *args, **kw: machine)
    cache = tmp_path / "cache"
    if where == "a file":
        cache.write_text("x")
        reason = "a file is in the way"
    else:
        def read_only(self, path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

        monkeypatch.setattr(Hardware, "save", read_only)
        reason = os.strerror(errno.EROFS)
    with caplog.at_level("WARNING", logger="flexgen_dist.profile"):
        got = profile.load_or_profile("cpu", tmp_path, environ={"FLEXGEN_CACHE_DIR": str(cache)})
    assert got == machine
    [record] = [r for r in caplog.records if r.name == "flexgen_dist.profile"]
    assert f"cannot cache the hardware profile in {cache} ({reason})" in record.getMessage()
    assert "FLEXGEN_CACHE_DIR" in record.getMessage()


def test_a_failed_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(EnvironmentFailure, match="the disk is full"):
        cpu_machine().save(tmp_path / "hw.json")
    assert list(tmp_path.iterdir()) == []


def test_disk_falls_back_when_o_direct_is_refused(tmp_path, monkeypatch):
    from flexgen_dist.machine import microbench

    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")  # EINVAL, as tmpfs answers
        return real_open(path, flags, *args)

    monkeypatch.setattr(microbench.os, "open", no_direct)
    read_bw, write_bw, latency, how = microbench.disk_bandwidths(tmp_path, 2 * microbench.DISK_CHUNK)
    assert read_bw > 0 and write_bw > 0 and latency >= 0
    assert "posix_fadvise" in how and "write: buffered" in how
    assert list(tmp_path.iterdir()) == []
