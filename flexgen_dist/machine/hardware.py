"""What a rank has to plan with: memory capacities per tier and the speeds of moving and computing.

Pure Python (no torch): `machine/detect.py` fills in the capacities of this process,
`flexgen_dist.profile` measures the speeds, and a JSON file (`--hardware FILE.json`) or a preset
describes a machine you do not have. The cost model and the policy search read a `Hardware`.

Units: capacities in bytes, bandwidths in bytes/s, compute in flop/s. Flops are counted the way
FlexGen's cost model counts them, so its fitted constants (the T4 preset) mean the same here:
- matmul: 2 * rows * in_dim * out_dim for (rows, in_dim) x (in_dim, out_dim);
- attention: 4 * queries * keys * hidden per sequence (2 for q.k^T, 2 for p.v; hidden = heads *
  head_dim), masks not discounted: a causal prefill of S tokens counts 4 * S^2 * hidden.

Without a GPU the compute device is the CPU and the "gpu" tier is host memory, the same RAM as
the cpu tier: `Capacities.host_mem` then bounds the two tiers together (see `memory_limits`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..files import write_atomic
from ..sizes import format_size, parse_size

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # 2: speeds.elementwise_bw; 3: speeds.disk_read_latency, speeds.convert_bw
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


class FieldError(UserError):
    """A bad value of one field; the JSON loader prefixes the file and section."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class Capacities:
    """Bytes each tier may hold for one rank (or, before `rank_share`, for the whole machine)."""

    has_gpu: bool
    """True when the compute device is a CUDA GPU with its own memory. False: the compute device
    is the CPU and the gpu tier is host memory."""
    gpu_mem: int
    """Bytes the gpu tier may hold: free memory of the GPU; without a GPU, host RAM (the gpu tier
    lives there), so by default gpu_mem == cpu_mem == host_mem."""
    cpu_mem: int
    """Bytes the cpu tier (host memory, pinned where it pays) may hold."""
    host_mem: int
    """Host RAM this rank may use in all. Without a GPU it bounds the gpu and the cpu tier
    together (both are host memory); with one it bounds the cpu tier like cpu_mem does."""
    disk_mem: int
    """Bytes the disk tier may write: free space of the offload folder's file system."""

    def __post_init__(self) -> None:
        if not isinstance(self.has_gpu, bool):
            raise FieldError("has_gpu", f"must be true or false, got {self.has_gpu!r}")
        for name in ("gpu_mem", "cpu_mem", "host_mem", "disk_mem"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise FieldError(name, f"must be a whole number of bytes >= 0, got {value!r}")


DECODE_MATMUL_ROWS = 32  # the rows at which the profile measures decode_matmul_flops


@dataclass(frozen=True)
class Speeds:
    """How fast this machine moves and computes, measured by `python -m flexgen_dist.profile`."""

    compute_dtype: str
    """dtype of the device numbers below (matmul, attention, quantization): float32 on a CPU,
    float16 or bfloat16 on a GPU."""
    h2d_bw: float
    """Host-to-device copy, bytes/s: pinned host memory to the GPU, large contiguous tensors.
    Without a GPU: a host memory copy (what moving between the two host tiers costs)."""
    d2h_bw: float
    """Device-to-host copy into pinned host memory, bytes/s (host memory copy without a GPU)."""
    disk_read_bw: float
    """Sequential read of the offload folder, page cache bypassed, bytes/s."""
    disk_write_bw: float
    """Sequential write to the offload folder, flushed to the disk (page cache bypassed), bytes/s."""
    matmul_flops: float
    """GEMM throughput on the compute device in compute_dtype with many rows (prefill: rows =
    batch * prompt tokens), flop/s."""
    decode_matmul_flops: float
    """GEMM throughput with DECODE_MATMUL_ROWS rows (decode: rows = one GPU batch), flop/s. Lower
    than matmul_flops: the weights are read once for few rows, so it is bound by memory
    bandwidth. With the two rates a GEMM of r rows takes a fixed time (reading the weights) plus
    r rows at the peak rate (cost_terms.matmul_seconds)."""
    attention_flops: float
    """Causal prefill attention on the compute device in compute_dtype, flop/s (counted dense)."""
    decode_attention_flops: float
    """Decode attention on the compute device: one query per sequence over a KV cache on the
    device, flop/s. 4 flop per cached key per hidden dim, i.e. bytes of KV read per second =
    decode_attention_flops * itemsize / 2."""
    cpu_attention_flops: float
    """Decode attention on the CPU over a host-memory KV cache held in compute_dtype
    (`cpu_cache_compute`), flop/s. Equals decode_attention_flops's measurement without a GPU."""
    quantize_bw: float
    """4-bit group-wise quantization on the compute device, bytes/s of the compute_dtype input."""
    dequantize_bw: float
    """4-bit dequantization on the compute device, bytes/s of the compute_dtype output."""
    elementwise_bw: float
    """Elementwise passes on the compute device (norms, activations, RoPE, residual adds, the
    cache's new rows), bytes/s read and written: `a * b` into a new tensor of a prefill's size.
    Next to matmuls these are small in a large model and most of the time of a small one."""

    disk_read_latency: float = 0.0
    """Seconds each read call costs beyond its bytes at disk_read_bw (seek, queueing, the system
    call): measured as random 64 KiB reads of the disk test's file, page cache bypassed, less
    what their bytes take at the sequential rate. A plan reading many small pieces pays it per
    piece. 0: not measured (every read at the sequential rate)."""
    convert_bw: float = 0.0
    """16-bit storage converted to the fp32 compute dtype on the CPU, into a reused buffer (as the
    engine converts weights into their slot and a cache into its scratch), bytes/s of output.
    0: not measured (a conversion at the host copy rate)."""

    def __post_init__(self) -> None:
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise FieldError("compute_dtype", f"must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        for field in dataclasses.fields(self):
            if field.name == "compute_dtype":
                continue
            value = getattr(self, field.name)
            optional = field.name in ("disk_read_latency", "convert_bw")  # 0: not measured
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                    or (value == 0 and not optional):
                what = "a number >= 0" if optional else "a positive number"
                raise FieldError(field.name, f"must be {what}, got {value!r}")


@dataclass(frozen=True)
class MemoryLimit:
    """One memory constraint of the planner: the bytes placed on `tiers`, summed, <= capacity."""

    tiers: tuple[str, ...]
    capacity: int


@dataclass(frozen=True)
class Hardware:
    """Capacities and speeds one rank plans with."""

    name: str
    """Where the numbers come from, e.g. "profiled: host1 cuda (NVIDIA H100)" or a preset's name."""
    capacities: Capacities
    speeds: Speeds
    notes: tuple[str, ...] = ()
    """Provenance a reader should know: how disk reads bypassed the page cache, stand-in kernels."""

    def __post_init__(self) -> None:
        if not isinstance(self.capacities, Capacities) or not isinstance(self.speeds, Speeds):
            raise UserError("Hardware needs a Capacities and a Speeds (build them by keyword)")
        if not isinstance(self.notes, tuple) or not all(isinstance(n, str) for n in self.notes):
            raise FieldError("notes", "must be a list of strings")

    def memory_limits(self) -> tuple[MemoryLimit, ...]:
        """The planner's memory constraints: one per tier, plus the shared host RAM."""
        c = self.capacities
        host_tiers = ("cpu",) if c.has_gpu else ("gpu", "cpu")
        return (
            MemoryLimit(("gpu",), c.gpu_mem),
            MemoryLimit(("cpu",), c.cpu_mem),
            MemoryLimit(("disk",), c.disk_mem),
            MemoryLimit(host_tiers, c.host_mem),
        )

    def with_capacities(self, capacities: Capacities) -> Hardware:
        """These speeds with other capacities (a cached profile with this run's free memory)."""
        return dataclasses.replace(self, capacities=capacities)

    def summary(self) -> str:
        c = self.capacities
        gpu = f"gpu {format_size(c.gpu_mem)}" if c.has_gpu else f"gpu tier in host RAM {format_size(c.gpu_mem)}"
        return (f"{self.name}: {gpu}, cpu {format_size(c.cpu_mem)}, host {format_size(c.host_mem)}, "
                f"disk {format_size(c.disk_mem)}")

    # --- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "notes": list(self.notes),
            "capacities": dataclasses.asdict(self.capacities),
            "speeds": dataclasses.asdict(self.speeds),
        }

    @classmethod
    def from_dict(cls, data: object, where: str = "hardware description") -> Hardware:
        """Validated; a bad field raises `UserError` naming `where` (the file) and the field."""

        def fail(field: str, problem: str) -> UserError:
            return UserError(f"{where}: field {field} {problem}; fix it, or write a new one with "
                             "python -m flexgen_dist.profile --out FILE")

        if not isinstance(data, Mapping):
            raise fail("(top level)", "must be a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise fail("schema_version", f"is {version!r}, this flexgen_dist reads {SCHEMA_VERSION}")
        _check_keys(data, {"schema_version", "name", "notes", "capacities", "speeds"}, "", fail)
        name, notes = data["name"], data["notes"]
        if not isinstance(name, str):
            raise fail("name", f"must be a string, got {name!r}")
        if not isinstance(notes, list):
            raise fail("notes", "must be a list of strings")
        sections = {}
        for section, kind in (("capacities", Capacities), ("speeds", Speeds)):
            raw = data[section]
            if not isinstance(raw, Mapping):
                raise fail(section, "must be a JSON object")
            _check_keys(raw, {f.name for f in dataclasses.fields(kind)}, f"{section}.", fail)
            values = dict(raw)
            if kind is Capacities:
                for key in ("gpu_mem", "cpu_mem", "host_mem", "disk_mem"):
                    values[key] = _size_field(values[key], f"{section}.{key}", fail)
            try:
                sections[section] = kind(**values)
            except FieldError as e:
                raise fail(f"{section}.{e.field}", e.problem) from None
        try:
            return cls(name=name, notes=tuple(notes), **sections)
        except FieldError as e:
            raise fail(e.field, e.problem) from None

    def save(self, path: str | Path) -> None:
        """Write atomically (`files.write_atomic`), so a reader never sees half a file, and two
        processes saving at once leave one whole file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    @classmethod
    def load(cls, path: str | Path) -> Hardware:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise UserError(f"cannot read hardware file {path}: {e.strerror or e}; give an existing "
                            "JSON file written by python -m flexgen_dist.profile --out FILE") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix it, or write a new one "
                            "with python -m flexgen_dist.profile --out FILE") from None
        return cls.from_dict(data, where=str(path))


def _check_keys(raw: Mapping, allowed: set[str], prefix: str, fail) -> None:
    missing = sorted(allowed - set(raw))
    if missing:
        raise fail(prefix + missing[0], "is missing")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise fail(prefix + unknown[0], f"is not a known field (known: {', '.join(sorted(allowed))})")


def _size_field(value: object, field: str, fail) -> object:
    """A capacity as bytes: an integer, or a size such as "16G" for hand-written files."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return parse_size(value, field)
        except UserError:
            raise fail(field, f"{value!r} is not a size (give bytes or e.g. 16G, 512MB)") from None
    return value


# --- per-rank shares and explicit capacities ----------------------------------------------------


def rank_share(machine: Hardware, *, local_world_size: int, ranks_per_gpu: int = 1) -> Hardware:
    """What one of `local_world_size` ranks on this node plans with.

    The ranks share host RAM, the offload disk and the CPU cores, so each gets 1/local_world_size
    of host memory, disk space, disk bandwidth and CPU compute (CPU attention; without a GPU, all
    device compute and the host copies too). Each GPU is its own unless `ranks_per_gpu` > 1: then
    its memory, compute and PCIe link are split among the ranks that share it. Run this on
    capacities detected before any rank allocates, or each rank sees the others' allocations too.
    """
    if local_world_size < 1 or ranks_per_gpu < 1:
        raise UserError(f"local_world_size={local_world_size} and ranks_per_gpu={ranks_per_gpu} must be >= 1")
    if local_world_size == 1 and ranks_per_gpu == 1:
        return machine
    c, s = machine.capacities, machine.speeds
    node, gpu = local_world_size, (ranks_per_gpu if c.has_gpu else local_world_size)
    capacities = dataclasses.replace(
        c, gpu_mem=c.gpu_mem // gpu, cpu_mem=c.cpu_mem // node, host_mem=c.host_mem // node, disk_mem=c.disk_mem // node
    )
    device = {name: getattr(s, name) / gpu for name in (
        "h2d_bw", "d2h_bw", "matmul_flops", "decode_matmul_flops", "attention_flops",
        "decode_attention_flops", "quantize_bw", "dequantize_bw", "elementwise_bw")}
    speeds = dataclasses.replace(
        s, **device, disk_read_bw=s.disk_read_bw / node, disk_write_bw=s.disk_write_bw / node,
        cpu_attention_flops=s.cpu_attention_flops / node,
    )
    share = f"1/{local_world_size} of the node" + (f", 1/{ranks_per_gpu} of a GPU" if c.has_gpu and ranks_per_gpu > 1 else "")
    return dataclasses.replace(machine, name=f"{machine.name} ({share} per rank)", capacities=capacities, speeds=speeds)


def apply_overrides(
    hardware: Hardware, *, gpu_mem: int | None = None, cpu_mem: int | None = None, disk_mem: int | None = None
) -> Hardware:
    """Explicit per-rank capacities (`--gpu-mem`, `--cpu-mem`, `--disk-mem`, already in bytes) over
    detected ones. An explicit value wins even above what was detected (logged as a warning).

    Host RAM: with a GPU, `--cpu-mem` is all the host RAM the rank may use (host_mem = cpu_mem).
    Without one both tiers are host RAM: given both, host_mem = gpu_mem + cpu_mem (the user split
    it); given one, that tier is capped and host_mem stays the detected share (raised to the value
    given if that is larger), so the other tier may use what is left.
    """
    c = hardware.capacities
    given = {"gpu_mem": gpu_mem, "cpu_mem": cpu_mem, "disk_mem": disk_mem}
    given = {name: value for name, value in given.items() if value is not None}
    if not given:
        return hardware
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"--{name.replace('_', '-')} {value!r} must be a byte count >= 0 (e.g. parse_size('16G'))")
        if value > getattr(c, name):
            logger.warning("--%s %s is above the %s detected for this rank; planning with it anyway",
                           name.replace("_", "-"), format_size(value), format_size(getattr(c, name)))
    host_mem = c.host_mem
    if c.has_gpu:
        host_mem = given.get("cpu_mem", c.host_mem)
    elif "gpu_mem" in given and "cpu_mem" in given:
        host_mem = given["gpu_mem"] + given["cpu_mem"]
    elif "gpu_mem" in given or "cpu_mem" in given:
        host_mem = max(c.host_mem, given.get("gpu_mem", 0), given.get("cpu_mem", 0))
    capacities = dataclasses.replace(c, **given, host_mem=host_mem)
    names = ", ".join(f"--{n.replace('_', '-')}" for n in given)
    return dataclasses.replace(hardware, name=f"{hardware.name}, {names} given", capacities=capacities)
