"""What the cases of tools/hostile_cases.py are made of: the commands they run, the checks of
their outcome, and the setups that damage a model folder, an offload folder or an input before
the command runs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from hostile_audit import CaseDir, Result, Skip

PY = sys.executable
RUN = [PY, "-m", "flexgen_dist.run"]
EVAL = [PY, "-m", "flexgen_dist.eval"]
MERGE = [PY, "-m", "flexgen_dist.merge"]
PROFILE = [PY, "-m", "flexgen_dist.profile"]
BENCH = [PY, "-m", "flexgen_dist.bench"]
FAST = ["--no-warmup", "--quiet"]
DISK = ["--percent", "0", "0", "100", "0", "100", "0"]  # every weight on the disk tier


def s(*args) -> list[str]:
    return [str(a) for a in args]


def tiny(c: CaseDir, *extra) -> list[str]:
    """A quick run of the tiny llama on random prompts."""
    return RUN + s("--model", c.fx.llama, "--prompt-len", 4, "--num-prompts", 4, "--max-new-tokens", 2, *FAST, *extra)


def job(c: CaseDir, input_path, *extra, model=None, output="out.jsonl") -> list[str]:
    """A job of the tiny llama: --input, --output out.jsonl."""
    return RUN + s("--model", model or c.fx.llama, "--input", input_path, "--output", output, "--max-new-tokens", 4,
                   *FAST, *extra)


def good_job(c: CaseDir, *extra, **kw) -> list[str]:
    return job(c, c.fx.good, *extra, **kw)


def lines(rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def good_rows(c: CaseDir) -> list[dict]:
    return [json.loads(line) for line in c.fx.good.read_text().splitlines()]


# ---- checks ---------------------------------------------------------------------------------------


def matches_reference(name: str = "out.jsonl", ids: list | None = None):
    """The output holds every reference id once, in input order, with the reference's tokens."""

    def check(c: CaseDir, r: Result) -> str | None:
        if r.code != 0:
            return None
        path = c.d / name
        if not path.exists():
            return f"exit 0 but no {name}"
        rows = c.read_jsonl(name)
        got = [json.dumps(row.get("id")) for row in rows]
        want = ids if ids is not None else list(c.fx.reference)
        if got != want:
            return f"silent wrong output: ids {got} != {want}"
        for row in rows:
            key = json.dumps(row["id"])
            if key in c.fx.reference and row["output_ids"] != c.fx.reference[key]:
                return f"silent wrong output: id {key} gave {row['output_ids']}, reference {c.fx.reference[key]}"
        return None

    return check


def nothing_written(*names):
    def check(c: CaseDir, r: Result) -> str | None:
        made = [n for n in names if (c.d / n).exists()]
        return f"left {made} behind after an error" if made else None

    return check


def message_has(*fragments):
    def check(c: CaseDir, r: Result) -> str | None:
        missing = [f for f in fragments if f not in r.message]
        return f"message lacks {missing}" if missing else None

    return check


def partial_nonempty(c: CaseDir, name: str = "out.jsonl") -> bool:
    path = c.d / f"{name}.partial"
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def stdout_has(text):
    def check(c: CaseDir, r: Result) -> str | None:
        return None if r.code != 0 or text in r.stdout else f"stdout lacks {text!r}"

    return check


# ---- setups ---------------------------------------------------------------------------------------


def write_input(content: str | bytes, name: str = "in.jsonl"):
    def setup(c: CaseDir) -> None:
        c.write(name, content)

    return setup


def fifo(name: str):
    def setup(c: CaseDir) -> None:
        os.mkfifo(c.d / name)

    return setup


def model_with(mutate):
    """A copy of the tiny llama at `model/`, changed by mutate(path)."""

    def setup(c: CaseDir) -> None:
        mutate(c.copy_model(c.fx.llama))

    return setup


def edit_config(**changes):
    def mutate(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        for key, value in changes.items():
            if value is ...:
                config.pop(key, None)
            else:
                config[key] = value
        (model / "config.json").write_text(json.dumps(config))

    return mutate


def edit_weights(fn):
    def mutate(model: Path) -> None:
        from safetensors.torch import load_file, save_file

        weights = load_file(model / "model.safetensors")
        fn(weights)
        save_file(weights, model / "model.safetensors", metadata={"format": "pt"})

    return mutate


def weights_nan(weights):
    weights["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")


def weights_inf_embed(weights):
    weights["model.embed_tokens.weight"][10:20] = float("inf")


def weights_wrong_shape(weights):
    import torch

    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(64, 64)


def weights_int_dtype(weights):
    weights["model.layers.0.input_layernorm.weight"] = weights["model.layers.0.input_layernorm.weight"].to(
        __import__("torch").int32)


def weights_missing_tensor(weights):
    del weights["model.layers.1.self_attn.o_proj.weight"]


def truncate_file(name: str, keep: float):
    def mutate(model: Path) -> None:
        path = model / name
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])

    return mutate


def garbage_same_size(model: Path) -> None:
    path = model / "model.safetensors"
    path.write_bytes(os.urandom(path.stat().st_size))


def header_length(value: int):
    def mutate(model: Path) -> None:
        path = model / "model.safetensors"
        data = bytearray(path.read_bytes())
        data[:8] = struct.pack("<Q", value)
        path.write_bytes(bytes(data))

    return mutate


def header_offsets_past_end(model: Path) -> None:
    """A well-formed header whose last tensor ends past the file (a copy cut short by exactly its data)."""
    path = model / "model.safetensors"
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    path.write_bytes(data[: 8 + length + 16])


def sharded_missing_shard(c: CaseDir) -> None:
    model = c.copy_model(c.fx.sharded)
    shards = sorted(model.glob("model-*.safetensors"))
    shards[-1].unlink()


def sharded_index_garbage(c: CaseDir) -> None:
    model = c.copy_model(c.fx.sharded)
    (model / "model.safetensors.index.json").write_text("{not json")


def sharded_index_wrong_file(c: CaseDir) -> None:
    model = c.copy_model(c.fx.sharded)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../fixtures/llama/model.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


def opt_weights_in_llama(c: CaseDir) -> None:
    model = c.copy_model(c.fx.llama)
    (model / "model.safetensors").write_bytes((c.fx.opt / "model.safetensors").read_bytes())


def pickle_named_safetensors(model: Path) -> None:
    import torch

    torch.save({"x": torch.zeros(3)}, model / "model.safetensors")


def safetensors_dir(model: Path) -> None:
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").mkdir()


def safetensors_fifo(model: Path) -> None:
    (model / "model.safetensors").unlink()
    os.mkfifo(model / "model.safetensors")


def safetensors_symlink(model: Path) -> None:
    target = model.parent / "blobs" / "abc123"
    target.parent.mkdir()
    (model / "model.safetensors").rename(target)
    (model / "model.safetensors").symlink_to(target)


def tokenizer_garbage(model: Path) -> None:
    (model / "tokenizer.json").write_text("{this is not a tokenizer")


def config_text(text: bytes):
    def mutate(model: Path) -> None:
        (model / "config.json").write_bytes(text)

    return mutate


# ---- offload folder -------------------------------------------------------------------------------


def populated_offload(c: CaseDir) -> Path:
    """Run the tiny job once with every weight on disk in `off/`; returns the weights folder."""
    proc = subprocess.run(good_job(c, *DISK, "--offload-dir", "off", output="first.jsonl"), cwd=c.d,
                          env=c.data["env"], capture_output=True, text=True, timeout=300)
    if proc.returncode:
        raise Skip(f"the populating run failed: {proc.stderr.strip()[-100:]}")
    folders = list((c.d / "off").glob("weights-*"))
    if len(folders) != 1:
        raise Skip(f"expected one weights folder, found {folders}")
    return folders[0]


def first_bin(folder: Path) -> Path:
    return sorted(folder.glob("*.bin"))[0]


def offload_then(change):
    def setup(c: CaseDir) -> None:
        change(c, populated_offload(c))
        (c.d / "first.jsonl").unlink()

    return setup


def torn_weight(c: CaseDir, folder: Path) -> None:
    path = first_bin(folder)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_same_size_same_mtime(c: CaseDir, folder: Path) -> None:
    path = first_bin(folder)
    st = path.stat()
    data = bytearray(path.read_bytes())
    for i in range(0, len(data), 4):
        data[i : i + 4] = struct.pack("<f", 7.0)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def planted_symlink(c: CaseDir, folder: Path) -> None:
    victim = c.write("victim.txt", "the user's precious file\n")
    path = first_bin(folder)
    path.unlink()
    path.symlink_to(victim)


def planted_entry_fifo(c: CaseDir, folder: Path) -> None:
    entry = sorted(folder.glob("*.entry.json"))[0]
    entry.unlink()
    os.mkfifo(entry)


def garbage_entry(c: CaseDir, folder: Path) -> None:
    sorted(folder.glob("*.entry.json"))[0].write_bytes(b"\xff\xfe garbage")


def chown_nobody(c: CaseDir, folder: Path) -> None:
    os.chown(folder, 65534, 65534)


def group_writable(c: CaseDir, folder: Path) -> None:
    os.chmod(folder, 0o770)


def stale_temp(c: CaseDir, folder: Path) -> None:
    (folder / ".x.bin.12345.deadbeef.tmp").write_bytes(b"half a file")


def weights_folder_is_symlink(c: CaseDir, folder: Path) -> None:
    elsewhere = c.d / "elsewhere"
    folder.rename(elsewhere)
    folder.symlink_to(elsewhere)


# ---- environment ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def other_service(reply: bytes | None):
    """Setup: an unrelated TCP service on a free port (c.data["port"]) that accepts every connection,
    then stays silent (reply None) or answers whatever it receives with `reply`; stopped after the case."""
    def setup(c: CaseDir) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.1)
        closed = threading.Event()
        connections: list[socket.socket] = []

        def talk(connection: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while connection.recv(4096):
                    if reply is not None:
                        connection.sendall(reply)

        def accept() -> None:
            while not closed.is_set():
                try:
                    connection, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                connections.append(connection)
                threading.Thread(target=talk, args=(connection,), daemon=True).start()

        def stop() -> None:
            closed.set()
            listener.close()
            for connection in connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)  # wakes its reader
                connection.close()

        threading.Thread(target=accept, daemon=True).start()
        c.data["port"] = listener.getsockname()[1]
        c.cleanups.append(stop)
    return setup


# Rank 0's store that checks rank 0 in, waits until rank 1 has checked in and begun connecting the
# process group (a key beyond the roll call's two), then stops itself: a rank 0 frozen mid-rendezvous.
_FROZEN_RANK_0 = '''
import os, signal, sys, time
from datetime import timedelta
import torch.distributed as dist
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), None, True, timedelta(seconds=300), wait_for_workers=False)
store.add("flexgen_dist/rendezvous/rank/0", 1)
store.wait(["flexgen_dist/rendezvous/rank/1"])
while store.num_keys() <= 2:
    time.sleep(0.01)
os.kill(os.getpid(), signal.SIGSTOP)
'''


def frozen_rank0(c: CaseDir) -> None:
    """Setup: a fake rank 0 at c.data["port"] that stops (SIGSTOP) once rank 1 starts connecting the
    process group; killed after the case."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        c.data["port"] = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", _FROZEN_RANK_0, str(c.data["port"])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop() -> None:
        proc.kill()  # SIGKILL ends a stopped process too
        proc.wait()

    c.cleanups.append(stop)


def signal_job_setup(c: CaseDir) -> None:
    """A job of the bundled model long enough to be interrupted: 400 text prompts, small blocks."""
    c.write("in.jsonl", lines({"id": i, "prompt": f"Line {i}: the function returns"} for i in range(400)))


def signal_job(c: CaseDir) -> list[str]:
    return RUN + s("--input", "in.jsonl", "--output", "out.jsonl", "--max-new-tokens", 24, "--policy", "manual",
                   "--gpu-batch-size", 2, *FAST)


def interrupted_check(c: CaseDir, r: Result) -> str | None:
    if r.code not in (130, 143):
        return None
    if (c.d / "out.jsonl").exists():
        return "an interrupted run wrote the final output"
    if not partial_nonempty(c):
        return "finished results were not kept"
    if "run the same command again" not in r.message:
        return "the line does not say how to resume"
    return None


def sigterm_then_resume(c: CaseDir) -> None:
    signal_job_setup(c)
    env = c.data["env"]
    proc = subprocess.Popen(signal_job(c), cwd=c.d, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not partial_nonempty(c):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    if not partial_nonempty(c):
        raise Skip("the first run ended before it could be interrupted")


def resumed_check(c: CaseDir, r: Result) -> str | None:
    if r.code != 0:
        return None
    ids = [row["id"] for row in c.read_jsonl("out.jsonl")]
    if ids != list(range(400)):
        return f"resumed output ids are not 0..399 in order (got {len(ids)})"
    if (c.d / "out.jsonl.partial").exists() or (c.d / "out.jsonl.run.json").exists():
        return "progress files left after a finished run"
    return None


def in_model_folder_setup(c: CaseDir) -> None:
    """A copy of the bundled model with the long job's input, output and progress files inside
    it, interrupted by SIGTERM once its first blocks are saved (the rerun must resume)."""
    model = c.copy_model(c.fx.bundled)
    c.write("model/in.jsonl", lines({"id": i, "prompt": f"Line {i}: the function returns"} for i in range(400)))
    proc = subprocess.Popen(in_model_folder_job(c), cwd=c.d, env=c.data["env"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not partial_nonempty(c, "model/out.jsonl"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    if not partial_nonempty(c, "model/out.jsonl"):
        raise Skip("the first run ended before it could be interrupted")
    (model / "notes.txt").write_text("the user's notes beside the model\n")


def in_model_folder_job(c: CaseDir) -> list[str]:
    return RUN + s("--model", "model", "--input", "model/in.jsonl", "--output", "model/out.jsonl", "--max-new-tokens",
                   24, "--policy", "manual", "--gpu-batch-size", 2, *FAST)


def in_model_folder_check(c: CaseDir, r: Result) -> str | None:
    if r.code != 0:
        return None
    if "resumed:" not in r.stdout:
        return "the rerun did not resume"
    ids = [row["id"] for row in c.read_jsonl("model/out.jsonl")]
    return None if ids == list(range(400)) else f"resumed output ids are not 0..399 in order (got {len(ids)})"


# ---- the model's generation config, tied heads -----------------------------------------------------


def generation_config(content):
    """A model mutation: write generation_config.json (a dict as JSON, or text as it is)."""

    def mutate(model: Path) -> None:
        (model / "generation_config.json").write_text(content if isinstance(content, str) else json.dumps(content))

    return mutate


def eos_from_reference(c: CaseDir) -> None:
    """The tiny llama with generation_config.json listing, besides EOS 2, a token the reference
    continuation of the first good prompt emits at its step 1 (config.json's EOS stays 2)."""
    model = c.copy_model(c.fx.llama)
    token = next(iter(c.fx.reference.values()))[1]
    c.data["eos"] = token
    generation_config({"bos_token_id": 1, "eos_token_id": [2, token], "pad_token_id": 0})(model)


def stops_at_generation_eos(c: CaseDir, r: Result) -> str | None:
    """Each row is the reference cut after the first generation-config EOS, finish_reason "stop"
    there (transformers stops at it; config.json alone does not list it)."""
    if r.code != 0:
        return None
    token = c.data["eos"]
    rows = {json.dumps(row["id"]): row for row in c.read_jsonl("out.jsonl")}
    for key, ref in c.fx.reference.items():
        want = ref[:ref.index(token) + 1] if token in ref else ref
        row = rows.get(key)
        if row is None or row["output_ids"] != want:
            return f"silent wrong output: id {key} gave {row and row['output_ids']}, transformers stops at {want}"
        if token in ref and row["finish_reason"] != "stop":
            return f"id {key} stopped at the generation config's EOS with finish_reason {row['finish_reason']!r}"
    return None


def tied_with_own_head(model: Path) -> None:
    """config.json says tie_word_embeddings; the checkpoint keeps its distinct lm_head.weight
    (transformers 5 then keeps the stored head: the reference's logits)."""
    edit_config(tie_word_embeddings=True)(model)


# ---- outputs that cannot be replaced -----------------------------------------------------------------


def immutable(name: str, text: str = "the user's file\n"):
    def setup(c: CaseDir) -> None:
        path = c.write(name, text)
        proc = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if proc.returncode:
            raise Skip(f"cannot chattr +i ({proc.stderr.strip()[:80]})")
        c.cleanups.append(lambda: subprocess.run(["chattr", "-i", str(path)], capture_output=True))

    return setup


def overwrite_then_interrupted(c: CaseDir) -> None:
    """The long job with --overwrite over an existing output, stopped by SIGTERM after its first
    blocks: its one line must not say to run the same command (with --overwrite) again."""
    signal_job_setup(c)
    c.write("out.jsonl", "the user's old results\n")


# ---- merge ----------------------------------------------------------------------------------------


def merge_setup(*, missing: int | None = None, duplicate: bool = False, garbage: bool = False, foreign: bool = False):
    def setup(c: CaseDir) -> None:
        c.write("in.jsonl", lines({"id": i, "input_ids": [5, 6]} for i in range(4)))
        for index in range(2):
            if index == missing:
                continue
            rows = [{"id": i, "output_ids": [7]} for i in range(4) if i % 2 == index]
            if duplicate and index == 1:
                rows.append({"id": 0, "output_ids": [7]})
            if foreign and index == 1:
                rows.append({"id": 99, "output_ids": [7]})
            text = lines(rows) if not (garbage and index == 0) else "not json\n"
            c.write(f"out.shard-{index}-of-2.jsonl", text)

    return setup


# ---- standard output, progress files, provenance, scratch (issue items 5, 6, 9, 10) ---------------


def shell(script: str, argv: list[str]) -> list[str]:
    """`argv` run by bash with `script` around it ("$@" is the command)."""
    return ["bash", "-c", script, "bash", *argv]


def stdout_closed(argv: list[str]) -> list[str]:
    return shell('exec "$@" >&-', argv)


def stdout_to(path: str, argv: list[str]) -> list[str]:
    return shell(f'exec "$@" >{path}', argv)


def stdout_head_1(argv: list[str]) -> list[str]:
    """`argv | head -1`, exiting with the command's code (141: ended by the broken pipe)."""
    return shell('"$@" | head -1; exit "${PIPESTATUS[0]}"', argv)


def quiet_stderr(c: CaseDir, r: Result) -> str | None:
    return f"the broken pipe printed {len(r.err_lines)} lines" if r.code == 141 and r.err_lines else None


def complete_output(name: str = "out.jsonl"):
    """Whatever the exit (0, or 141 for a reader gone after the results were saved), the output
    is the reference run's."""

    def check(c: CaseDir, r: Result) -> str | None:
        return matches_reference(name)(c, Result(r.case, code=0))

    return check


def unfinished_job(change=None):
    """Progress files of the good job, as a run killed before finishing leaves them: every result
    in out.jsonl.partial and the run record; then change(c) edits them."""

    def setup(c: CaseDir) -> None:
        code = ("import sys; from flexgen_dist.jobs import resume; "
                "resume.ResumeLog.finish = lambda self, order: self.close(); "
                "from flexgen_dist.run import main; sys.exit(main(sys.argv[1:]))")
        proc = subprocess.run([PY, "-c", code, *good_job(c)[3:]], cwd=c.d, env=c.data["env"], capture_output=True,
                              text=True, timeout=300)
        if proc.returncode or not partial_nonempty(c):
            raise Skip(f"the unfinished run failed: {proc.stderr.strip()[-100:]}")
        if change is not None:
            change(c)

    return setup


def partial_foreign_id(c: CaseDir) -> None:
    path = c.d / "out.jsonl.partial"
    rows = path.read_text().splitlines(keepends=True)
    path.write_text("".join(rows[:2]) + json.dumps({"id": "not-in-input", "output_ids": [1]}) + "\n" + "".join(rows[2:]))


def partial_edited_line(c: CaseDir) -> None:
    path = c.d / "out.jsonl.partial"
    rows = path.read_text().splitlines(keepends=True)
    path.write_text(rows[0] + rows[1][: len(rows[1]) // 2] + "\n" + "".join(rows[2:]))


def partial_fixed(c: CaseDir) -> None:
    """A foreign line put in and taken out again, as the message says to."""
    path = c.d / "out.jsonl.partial"
    before = path.read_text()
    partial_foreign_id(c)
    path.write_text(before)


def record_field(name: str, value):
    def change(c: CaseDir) -> None:
        path = c.d / "out.jsonl.run.json"
        record = json.loads(path.read_text())
        record[name] = value
        path.write_text(json.dumps(record, indent=1) + "\n")

    return change


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def stale_kv_scratch(c: CaseDir) -> None:
    """The KV-cache scratch folder a SIGKILLed run left in the offload folder: named for its dead
    pid, as block_io names it."""
    from flexgen_dist.temp_names import host_tag

    folder = c.d / "off" / f".kv-cache.flexgen-tmp.{host_tag()}.{dead_pid()}.0123456789abcdef"
    folder.mkdir(parents=True, mode=0o700)
    (folder / "layer0_batch0_k.bin").write_bytes(b"\0" * 4096)
    c.data["stale"] = folder


def stale_kv_scratch_removed(c: CaseDir, r: Result) -> str | None:
    if r.code == 0 and c.data["stale"].exists():
        return "the dead run's KV scratch folder is still there"
    return matches_reference()(c, r)


def merge_made_by(*, odd: dict | None = None, old_input: bool = False, damaged: bool = False, only_one: bool = False):
    """Shards as merge_setup writes them, each with the record of the run that made it; shard 1's
    record changed by `odd`, or both made from an older in.jsonl, or one record of the wrong type."""

    def setup(c: CaseDir) -> None:
        import hashlib

        merge_setup()(c)
        text = (c.d / "in.jsonl").read_bytes()
        made_from = hashlib.sha256(text.replace(b"[5, 6]", b"[5, 7]") if old_input else text).hexdigest()
        for index in range(2):
            if only_one and index == 1:
                continue
            record = {"version": 1, "model": "m" * 64, "input_sha256": made_from,
                      "settings": {"max_new_tokens": 4, "seed": 0, "truncate": "none"}, "shard": f"{index}/2",
                      "output_format": "native", "started_at": 1700000000}
            if index == 1:
                record.update(odd or {})
                if damaged:
                    record["settings"] = "max_new_tokens=4"
            c.write(f"out.shard-{index}-of-2.jsonl.made-by.json", json.dumps(record, indent=1) + "\n")

    return setup
