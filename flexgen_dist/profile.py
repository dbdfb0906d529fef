"""Measure this machine's speeds once and cache them:

    python -m flexgen_dist.profile [--device cpu|cuda] [--dtype float16] [--offload-dir DIR] [--out FILE] [--quick]

Without --out the result goes to the per-machine cache, one file per host, device, compute dtype
and the file system of the offload folder (disk speeds differ per file system):
`$FLEXGEN_CACHE_DIR` or `~/.cache/flexgen_dist`,
`hardware-<host>-<machine>-<device>-<dtype>-<mount>.json`, where <machine> is a short hash of what
the speeds depend on (CPU model and vector extensions, cores, torch version): a machine that
changes under the same host name (a new VM, a torch upgrade) is profiled again.
A file written with --out is what `--hardware FILE.json` reads to plan for this machine elsewhere.

First use without a cached profile: `load_or_profile` measures a quick profile (a few seconds;
256 MiB of disk I/O, enough to leave a disk's burst behind; small kernels) and caches it, so planning just works; the full profile
(about a minute, a 1 GiB disk test) is worth running once per machine, and it replaces the quick
one. With several ranks per node, profile from one rank (`profile_if_missing=False` on the
others, after a barrier): ranks measuring at once would share the disk and the CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from .cli.shell import OneLineParser
from .jobs.outputs import check_output_path
from .errors import EnvironmentFailure, UserError
from .files import check_offload_folder
from .machine.detect import detect_capacities
from .machine.hardware import Hardware

logger = logging.getLogger(__name__)

DEFAULT_DTYPE = {"cpu": "float32", "cuda": "float16"}  # AVX2 CPUs are slow in 16 bits


def _mount_point(folder: Path) -> Path:
    path = folder.expanduser().absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    while not os.path.ismount(path) and path.parent != path:
        path = path.parent
    return path


def cache_path(device_type: str, compute_dtype: str, offload_dir: str | Path, *,
               environ: Mapping[str, str] | None = None) -> Path:
    """Where the profile of this host, device type, dtype and offload file system is cached."""
    environ = os.environ if environ is None else environ
    folder = Path(environ["FLEXGEN_CACHE_DIR"]) if environ.get("FLEXGEN_CACHE_DIR") else Path.home() / ".cache" / "flexgen_dist"
    mount = re.sub(r"[^A-Za-z0-9.-]+", "_", str(_mount_point(Path(offload_dir))).strip("/")) or "root"
    host = re.sub(r"[^A-Za-z0-9.-]+", "_", socket.gethostname()) or "host"
    return folder / f"hardware-{host}-{machine_key()}-{device_type}-{compute_dtype}-{mount}.json"


SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_fp16", "amx_tile")


def machine_key(cpuinfo: str | None = None) -> str:
    """8 hex digits naming what the profiled speeds depend on: the CPU's model, its vector
    extensions that 16-bit and fp32 kernels use, the cores this process may use, torch's version."""
    import hashlib

    import torch

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    what = "|".join([model, ",".join(f for f in SPEED_FLAGS if f in flags), str(cores), torch.__version__])
    return hashlib.sha256(what.encode()).hexdigest()[:8]


def profile_machine(device: str, offload_dir: str | Path, *, compute_dtype: str | None = None,
                    quick: bool = False) -> Hardware:
    """Capacities detected now and speeds measured now (`microbench.measure_speeds`)."""
    import torch

    from .machine.microbench import measure_speeds

    device_type = device.partition(":")[0]
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch.cuda is not available here; use --device cpu")
    if device_type not in DEFAULT_DTYPE:
        raise UserError(f"--device {device!r} is not cpu, cuda or cuda:N")
    dtype_name = compute_dtype or DEFAULT_DTYPE[device_type]
    dtype = getattr(torch, dtype_name, None)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UserError(f"--dtype {dtype_name!r} is not float32, float16 or bfloat16")
    torch_device = torch.device(device if device_type == "cpu" or ":" in device else "cuda:0")
    speeds, notes = measure_speeds(torch_device, dtype, Path(offload_dir).expanduser(), quick=quick)
    capacities = detect_capacities(device, offload_dir)  # logs them: after what can fail
    what = torch.cuda.get_device_name(torch_device) if device_type == "cuda" else "CPU"
    name = f"profiled{' (quick)' if quick else ''}: {socket.gethostname()} {device_type} ({what})"
    return Hardware(name=name, capacities=capacities, speeds=speeds, notes=notes)


def load_or_profile(device: str, offload_dir: str | Path, *, compute_dtype: str | None = None,
                    profile_if_missing: bool = True, environ: Mapping[str, str] | None = None) -> Hardware:
    """This machine's cached profile; without one (or with an unreadable one), a quick profile,
    cached, or with profile_if_missing=False a `UserError` saying how to make one. The
    capacities are those at profiling time: `machine_hardware` puts fresh ones in."""
    device_type = device.partition(":")[0]
    dtype_name = compute_dtype or DEFAULT_DTYPE.get(device_type, "float32")
    path = cache_path(device_type, dtype_name, offload_dir, environ=environ)
    how = (f"python -m flexgen_dist.profile --device {device_type} --dtype {dtype_name} "
           f"--offload-dir {offload_dir}")
    if path.exists():
        try:
            return Hardware.load(path)
        except UserError as e:
            if not profile_if_missing:
                raise UserError(f"{e} (a cached profile: delete it and run {how})") from None
            logger.warning("cached hardware profile unusable, measuring again: %s", e)
    elif not profile_if_missing:
        raise UserError(f"no hardware profile for this machine at {path}; run {how} once "
                        "(about a minute), or give --hardware FILE.json")
    logger.info("no hardware profile for this machine yet: measuring a quick one (a few seconds); "
                "for a more accurate one run %s", how)
    hardware = profile_machine(device, offload_dir, compute_dtype=dtype_name, quick=True)
    try:
        hardware.save(path)
    except (OSError, EnvironmentFailure) as exc:  # a read-only HOME, a file in the way, a full disk: only the next run pays
        reason = "a file is in the way" if isinstance(exc, (FileExistsError, NotADirectoryError)) else getattr(exc, "strerror", None)
        logger.warning("cannot cache the hardware profile in %s (%s); going on without it (the next run measures "
                       "again): set FLEXGEN_CACHE_DIR to a writable folder", path.parent, reason or exc)
    return hardware


def machine_hardware(device: str, offload_dir: str | Path | None, *, hardware: str | Path | None = None,
                     compute_dtype: str | None = None, profile_if_missing: bool = True) -> Hardware:
    """What the planner starts from, before `rank_share` and `apply_overrides`: the `--hardware`
    file or preset as written, else this machine's profiled speeds with capacities detected now."""
    if hardware is not None:  # the named machines and described files load only for --hardware
        from .machine.presets import hardware_from_arg

        return hardware_from_arg(hardware)
    if offload_dir is not None:  # a folder the run cannot use is the error, not a profile of it
        check_offload_folder(offload_dir)
    # No offload folder: no disk tier (disk_mem = 0), but Speeds wants a disk rate: the temp folder's.
    folder = offload_dir if offload_dir is not None else tempfile.gettempdir()
    try:
        profiled = load_or_profile(device, folder, compute_dtype=compute_dtype, profile_if_missing=profile_if_missing)
    except (UserError, OSError) as exc:
        if offload_dir is None:
            raise
        # An offload folder too small to measure: plan with the temp folder's disk speed. Not a
        # warning: the run's own check of the folder's space follows, and its error (if any)
        # should be the one line the user reads.
        note = f"disk speeds of {tempfile.gettempdir()}: the offload folder could not be measured ({exc})"
        logger.info("%s", note)
        profiled = load_or_profile(device, tempfile.gettempdir(), compute_dtype=compute_dtype,
                                   profile_if_missing=profile_if_missing)
        profiled = dataclasses.replace(profiled, notes=(*profiled.notes, note))
    return profiled.with_capacities(detect_capacities(device, offload_dir))


def format_table(hardware: Hardware) -> str:
    """A short table of capacities and speeds, for people."""
    from .sizes import format_size

    c, s = hardware.capacities, hardware.speeds

    def rate(value: float, unit: str) -> str:
        scaled = value / 1e12 if value >= 1e12 else value / 1e9
        return f"{scaled:8.2f} {'T' if value >= 1e12 else 'G'}{unit}"

    rows = [
        ("gpu tier", format_size(c.gpu_mem) + ("" if c.has_gpu else " (host RAM, shared with cpu tier)")),
        ("cpu tier / host RAM", f"{format_size(c.cpu_mem)} / {format_size(c.host_mem)}"),
        ("disk tier", format_size(c.disk_mem)),
        ("host -> device", rate(s.h2d_bw, "B/s")),
        ("device -> host", rate(s.d2h_bw, "B/s")),
        ("disk read", rate(s.disk_read_bw, "B/s")),
        ("disk write", rate(s.disk_write_bw, "B/s")),
        (f"matmul, prefill ({s.compute_dtype})", rate(s.matmul_flops, "FLOP/s")),
        (f"matmul, decode ({s.compute_dtype})", rate(s.decode_matmul_flops, "FLOP/s")),
        ("attention, prefill", rate(s.attention_flops, "FLOP/s")),
        ("attention, decode", rate(s.decode_attention_flops, "FLOP/s")),
        ("attention, decode on CPU", rate(s.cpu_attention_flops, "FLOP/s")),
        ("4-bit quantize", rate(s.quantize_bw, "B/s")),
        ("4-bit dequantize", rate(s.dequantize_bw, "B/s")),
        ("elementwise passes", rate(s.elementwise_bw, "B/s")),
        ("disk read, per call", f"{s.disk_read_latency * 1e6:8.1f} us" if s.disk_read_latency else "not measured"),
        ("16 -> 32-bit conversion", rate(s.convert_bw, "B/s") if s.convert_bw else "not measured"),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [hardware.name] + [f"  {label:<{width}}  {value.strip()}" for label, value in rows]
    return "\n".join(lines + [f"  note: {note}" for note in hardware.notes])


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m flexgen_dist.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda where there is one)")
    parser.add_argument("--dtype", default=None, help="compute dtype (default: float32 on cpu, float16 on cuda)")
    parser.add_argument("--offload-dir", default=".", help="folder whose disk to measure: the one you pass to run")
    parser.add_argument("--out", default=None, help="write the JSON here instead of the per-machine cache")
    parser.add_argument("--quick", action="store_true", help="small sizes: seconds, less accurate")
    args = parser.parse_args(argv)
    from .cli.shell import run_command

    def body() -> int:
        # the paths first: a typo fails in a second, with one line and before any log line
        check_offload_folder(args.offload_dir, create=False)
        if args.out is not None:
            check_output_path(args.out, flag="--out", allow_stdout=False)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            hardware = profile_machine(device, args.offload_dir, compute_dtype=args.dtype, quick=args.quick)
            out = Path(args.out) if args.out else cache_path(
                device.partition(":")[0], hardware.speeds.compute_dtype, args.offload_dir)
            hardware.save(out)
        except OSError as e:  # the environment (disk full, I/O error), not the user: one line, exit 1
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(format_table(hardware))
        print(f"written to {out}")
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
