"""The cases of tools/hostile_audit.py: bad flags, model folders, inputs, outputs, offload
folders, environment limits, launchers, and the merge / profile / eval / bench commands (their
commands, checks and setups are in tools/hostile_setups.py).

Each case says what a user should see: "user" (exit 2, one line), "env" (exit 1, one line),
"ok" (exit 0; a check compares the output with the reference run where there is one), "sig", or
"pipe" (141: standard output's reader went away, quietly).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from hostile_audit import Case, CaseDir, Result, Skip
from hostile_setups import (
    RUN, EVAL, MERGE, PROFILE, BENCH, FAST, DISK, s, tiny, job, good_job, lines, good_rows, matches_reference,
    nothing_written, partial_nonempty, stdout_has, write_input, fifo, model_with, edit_config, edit_weights,
    weights_nan, weights_inf_embed, weights_wrong_shape, weights_int_dtype, weights_missing_tensor, truncate_file, garbage_same_size,
    header_length, header_offsets_past_end, sharded_missing_shard, sharded_index_garbage,
    sharded_index_wrong_file, opt_weights_in_llama, pickle_named_safetensors, safetensors_dir,
    safetensors_fifo, safetensors_symlink, tokenizer_garbage, config_text, offload_then, torn_weight,
    corrupt_same_size_same_mtime, planted_symlink, planted_entry_fifo, garbage_entry, chown_nobody,
    group_writable, stale_temp, weights_folder_is_symlink, free_port, signal_job_setup, signal_job,
    interrupted_check, sigterm_then_resume, resumed_check, merge_setup, message_has,
    in_model_folder_setup, in_model_folder_job, in_model_folder_check, generation_config, eos_from_reference,
    stops_at_generation_eos, tied_with_own_head, immutable, overwrite_then_interrupted, other_service, frozen_rank0,
)
from hostile_setups import (
    stdout_closed, stdout_to, stdout_head_1, quiet_stderr, complete_output, unfinished_job,
    partial_foreign_id, partial_edited_line, partial_fixed, record_field, stale_kv_scratch, stale_kv_scratch_removed,
    merge_made_by,
)


# ---- the cases ------------------------------------------------------------------------------------


def flag_cases() -> list[Case]:
    bad = [  # (name, flags) for the tiny quick run: every one is the user's mistake
        ("max-new-tokens-text", ["--max-new-tokens", "abc"]),
        ("max-new-tokens-zero", ["--max-new-tokens", "0"]),
        ("max-new-tokens-negative", ["--max-new-tokens", "-5"]),
        ("max-new-tokens-huge", ["--max-new-tokens", str(10**12)]),
        ("gpu-batch-size-zero", ["--gpu-batch-size", "0"]),
        ("gpu-batch-size-negative", ["--gpu-batch-size", "-1"]),
        ("gpu-batch-size-float", ["--gpu-batch-size", "2.5"]),
        ("gpu-batch-size-huge-manual", ["--policy", "manual", "--gpu-batch-size", str(10**9)]),
        ("num-gpu-batches-zero", ["--num-gpu-batches", "0"]),
        ("num-gpu-batches-huge-manual", ["--policy", "manual", "--num-gpu-batches", str(10**9)]),
        ("percent-five-values", ["--percent", "1", "2", "3", "4", "5"]),
        ("percent-over-100", ["--percent", "150", "0", "100", "0", "100", "0"]),
        ("percent-negative", ["--percent", "-10", "110", "100", "0", "100", "0"]),
        ("percent-nan", ["--percent", "nan", "0", "100", "0", "100", "0"]),
        ("percent-inf", ["--percent", "inf", "0", "100", "0", "100", "0"]),
        ("percent-sum-over-100", ["--percent", "60", "60", "100", "0", "100", "0"]),
        ("percent-past-gpu-mem", ["--percent", "100", "0", "100", "0", "100", "0", "--gpu-mem", "4K"]),
        ("manual-with-max-latency", ["--policy", "manual", "--max-latency", "5"]),
        ("percent-with-max-latency", ["--percent", "100", "0", "100", "0", "100", "0", "--max-latency", "5"]),
        ("manual-with-allow-compression", ["--policy", "manual", "--allow-compression"]),
        ("max-latency-zero", ["--max-latency", "0"]),
        ("max-latency-negative", ["--max-latency", "-1"]),
        ("max-latency-nan", ["--max-latency", "nan"]),
        ("max-latency-impossible", ["--max-latency", "1e-9"]),
        ("shard-out-of-range", ["--shard", "4/4"]),
        ("shard-zero-count", ["--shard", "0/0"]),
        ("shard-text", ["--shard", "first"]),
        ("shard-negative", ["--shard", "-1/4"]),
        ("temperature-zero-sampling", ["--do-sample", "--temperature", "0"]),
        ("temperature-negative", ["--temperature", "-1"]),
        ("temperature-nan", ["--do-sample", "--temperature", "nan"]),
        ("temperature-inf", ["--do-sample", "--temperature", "inf"]),
        ("top-p-zero", ["--top-p", "0"]),
        ("top-p-over-1", ["--top-p", "1.5"]),
        ("top-p-nan", ["--top-p", "nan"]),
        ("top-k-negative", ["--top-k", "-1"]),
        ("seed-negative", ["--seed", "-1"]),
        ("seed-huge", ["--seed", str(2**64)]),
        ("stop-empty", ["--stop", ""]),
        ("stop-token-ids-text", ["--stop-token-ids", "a,b"]),
        ("stop-token-ids-outside-vocab", ["--stop-token-ids", "999999"]),
        ("stop-token-ids-negative", ["--stop-token-ids=-1"]),
        ("gpu-mem-text", ["--gpu-mem", "lots"]),
        ("gpu-mem-negative", ["--gpu-mem", "-1G"]),
        ("cpu-mem-one-byte", ["--cpu-mem", "1", "--gpu-mem", "1"]),
        ("disk-mem-text", ["--disk-mem", "1X"]),
        ("hardware-missing", ["--hardware", "nope.json"]),
        ("prefetch-depth-zero", ["--prefetch-depth", "0"]),
        ("prefetch-depth-huge", ["--prefetch-depth", str(10**9)]),
        ("io-threads-zero", ["--io-threads", "0"]),
        ("io-threads-huge", ["--io-threads", str(10**7)]),
        ("compress-bits-3", ["--compress-weight", "--compress-bits", "3"]),
        ("compress-group-size-zero", ["--compress-weight", "--compress-group-size", "0"]),
        ("compress-group-size-negative", ["--compress-cache", "--compress-group-size", "-4"]),
        ("attn-sparsity-zero", ["--attn-sparsity", "0"]),
        ("attn-sparsity-two", ["--attn-sparsity", "2"]),
        ("attn-sparsity-nan", ["--attn-sparsity", "nan"]),
        ("comm-timeout-zero", ["--comm-timeout", "0"]),
        ("comm-timeout-negative", ["--comm-timeout", "-1"]),
        ("comm-timeout-nan", ["--comm-timeout", "nan"]),
        ("device-cuda-without-gpu", ["--device", "cuda"]),
        ("device-unknown", ["--device", "tpu"]),
        ("device-garbage", ["--device", "cuda:x"]),
        ("stage-layers-one-process", ["--stage-layers", "1,1"]),
        ("stage-layers-text", ["--stage-layers", "a,b"]),
        ("num-prompts-zero", ["--num-prompts", "0"]),
        ("prompt-len-zero", ["--prompt-len", "0"]),
        ("prompt-len-past-positions", ["--prompt-len", "100000"]),
        ("overwrite-without-output", ["--overwrite"]),
        ("unknown-flag", ["--frobnicate"]),
    ]
    cases = [Case(f"flag-{name}", "flags", "user", (lambda c, f=flags: tiny(c, *f))) for name, flags in bad]
    cases += [
        Case("flag-percent-within-gpu-mem", "flags", "ok",
             lambda c: tiny(c, "--percent", 100, 0, 100, 0, 100, 0, "--gpu-mem", "1G")),
        Case("flag-num-prompts-huge", "flags", "user",
             lambda c: RUN + s("--model", c.fx.llama, "--prompt-len", 4, "--num-prompts", 10**12, *FAST), timeout=60),
        Case("flag-top-k-past-vocab", "flags", "ok|user", lambda c: tiny(c, "--do-sample", "--top-k", 10**6)),
        Case("flag-prompt-and-input", "flags", "user",
             lambda c: RUN + s("--model", c.fx.llama, "--prompt", "hi", "--input", c.fx.good, "--output", "o.jsonl")),
        Case("flag-input-without-output", "flags", "user", lambda c: RUN + s("--model", c.fx.llama, "--input", c.fx.good)),
        Case("flag-input-with-prompt-len", "flags", "user", lambda c: good_job(c, "--prompt-len", 4)),
        Case("flag-model-missing", "flags", "user", lambda c: RUN + s("--model", "no-such-model", *FAST)),
        Case("flag-model-is-a-file", "flags", "user", lambda c: RUN + s("--model", c.fx.good, *FAST)),
        Case("flag-hardware-garbage", "flags", "user", setup=write_input("{not json", "hw.json"),
             argv=lambda c: tiny(c, "--hardware", "hw.json")),
        Case("flag-hardware-folder", "flags", "user", lambda c: tiny(c, "--hardware", c.d)),
        # bytes that are not UTF-8 reach Python as surrogateescape characters (the tokenizer raised on them)
        Case("flag-prompt-not-utf8", "flags", "user", lambda c: RUN + s("--model", c.fx.llama, "--prompt",
                                                                        os.fsdecode(b"caf\xe9"), *FAST),
             check=message_has("--prompt: byte 0xe9 at character 4 is not UTF-8")),
        Case("flag-stop-not-utf8", "flags", "user", lambda c: tiny(c, "--stop", os.fsdecode(b"\xff")),
             check=message_has("--stop: byte 0xff")),
        Case("flag-stop-without-tokenizer", "flags", "user",
             lambda c: RUN + s("--model", c.fx.opt, "--prompt-len", 4, "--num-prompts", 2, "--stop", "x", *FAST)),
    ]
    return cases


def model_cases() -> list[Case]:
    def bad_model(name: str, mutate, expect: str = "user", **kw) -> Case:
        return Case(f"model-{name}", "model", expect, setup=model_with(mutate),
                    argv=lambda c: good_job(c, model="model"), **kw)

    return [
        bad_model("config-missing", lambda m: (m / "config.json").unlink()),
        bad_model("config-not-json", config_text(b"{model_type: llama")),
        bad_model("config-not-utf8", config_text(b'{"model_type": "llama\xff"}')),
        bad_model("config-empty", config_text(b"")),
        bad_model("config-a-list", config_text(b"[1, 2]")),
        bad_model("config-is-folder", lambda m: ((m / "config.json").unlink(), (m / "config.json").mkdir())),
        bad_model("config-hidden-size-string", edit_config(hidden_size="64")),
        bad_model("config-layers-fraction", edit_config(num_hidden_layers=2.5)),
        bad_model("config-layers-negative", edit_config(num_hidden_layers=-1)),
        bad_model("config-heads-not-dividing", edit_config(num_attention_heads=5)),
        bad_model("config-vocab-zero", edit_config(vocab_size=0)),
        bad_model("config-vocab-bool", edit_config(vocab_size=True)),
        bad_model("config-positions-zero", edit_config(max_position_embeddings=0)),
        bad_model("config-model-type-gpt2", edit_config(model_type="gpt2")),
        bad_model("config-model-type-missing", edit_config(model_type=...)),
        bad_model("config-rope-unknown", edit_config(rope_scaling={"rope_type": "yarn", "factor": 2.0})),
        bad_model("config-dtype-int8", edit_config(torch_dtype="int8", dtype="int8")),
        bad_model("config-eps-negative", edit_config(rms_norm_eps=-1.0)),
        bad_model("config-nan", config_text(b'{"model_type": "llama", "hidden_size": NaN}')),
        bad_model("safetensors-missing", lambda m: (m / "model.safetensors").unlink()),
        bad_model("safetensors-truncated-half", truncate_file("model.safetensors", 0.5)),
        bad_model("safetensors-truncated-header", truncate_file("model.safetensors", 0.001)),
        bad_model("safetensors-empty", truncate_file("model.safetensors", 0.0)),
        bad_model("safetensors-garbage-same-size", garbage_same_size),
        bad_model("safetensors-header-length-huge", header_length(2**63)),
        bad_model("safetensors-header-length-zero", header_length(0)),
        bad_model("safetensors-data-cut-off", header_offsets_past_end),
        bad_model("safetensors-pickle-by-name", pickle_named_safetensors),
        bad_model("safetensors-is-folder", safetensors_dir),
        bad_model("safetensors-fifo", safetensors_fifo, timeout=60),
        bad_model("safetensors-symlink-blob", safetensors_symlink, expect="ok", check=matches_reference()),
        bad_model("weights-nan", edit_weights(weights_nan)),
        bad_model("weights-inf-embedding-rows", edit_weights(weights_inf_embed)),
        bad_model("weights-wrong-shape", edit_weights(weights_wrong_shape)),
        bad_model("weights-int-dtype", edit_weights(weights_int_dtype)),
        bad_model("weights-tensor-missing", edit_weights(weights_missing_tensor)),
        bad_model("tokenizer-garbage", tokenizer_garbage),
        bad_model("generation-config-not-json", generation_config("{eos_token_id: [2, 7]")),
        bad_model("generation-config-a-list", generation_config("[2, 7]")),
        bad_model("generation-config-eos-string", generation_config({"eos_token_id": "2"})),
        bad_model("generation-config-eos-outside-vocab", generation_config({"eos_token_id": [2, 10**6]})),
        bad_model("generation-config-temperature-string", generation_config({"temperature": "hot"})),
        bad_model("generation-config-do-sample-string", generation_config({"do_sample": "false"})),
        bad_model("generation-config-sampling-at-temperature-0", generation_config({"do_sample": True, "temperature": 0})),
        bad_model("generation-config-is-folder", lambda m: ((m / "generation_config.json").unlink(missing_ok=True),
                                                          (m / "generation_config.json").mkdir())),
        # transformers stops at every id of generation_config.json's list (Llama-3-Instruct's end of turn)
        Case("model-generation-config-eos-list", "model", "ok", setup=eos_from_reference,
             argv=lambda c: good_job(c, model="model"), check=stops_at_generation_eos),
        # tie_word_embeddings with a distinct stored lm_head: transformers 5 keeps the stored head
        bad_model("tied-config-with-own-head", tied_with_own_head, expect="ok", check=matches_reference()),
        Case("model-opt-weights-llama-config", "model", "user", setup=opt_weights_in_llama,
             argv=lambda c: good_job(c, model="model")),
        Case("model-shard-missing", "model", "user", setup=sharded_missing_shard, argv=lambda c: good_job(c, model="model")),
        Case("model-shard-index-garbage", "model", "user", setup=sharded_index_garbage,
             argv=lambda c: good_job(c, model="model")),
        Case("model-shard-index-points-outside", "model", "user", setup=sharded_index_wrong_file,
             argv=lambda c: good_job(c, model="model")),
    ]


def input_cases() -> list[Case]:
    def rows_of(c):
        return good_rows(c)

    def bad_input(name: str, content, expect: str = "user", **kw) -> Case:
        return Case(f"input-{name}", "input", expect, setup=write_input(content),
                    argv=lambda c: job(c, "in.jsonl"), check=kw.pop("check", nothing_written("out.jsonl")), **kw)

    def derived(name: str, make, expect: str = "ok", check=None, **kw) -> Case:
        """An input made from the good one by make(text) -> bytes."""

        def setup(c: CaseDir) -> None:
            c.write("in.jsonl", make(c.fx.good.read_text()))

        return Case(f"input-{name}", "input", expect, setup=setup, argv=lambda c: job(c, "in.jsonl"),
                    check=check or (matches_reference() if expect == "ok" else nothing_written("out.jsonl")), **kw)

    def dup_id(text: str) -> bytes:
        rows = [json.loads(x) for x in text.splitlines()]
        rows[3]["id"] = rows[1]["id"]
        return lines(rows).encode()

    def mixed_ids(text: str) -> bytes:
        rows = [json.loads(x) for x in text.splitlines()][:2]
        rows[0]["id"], rows[1]["id"] = 1, "1"
        return lines(rows).encode()

    def unknown_fields(text: str) -> bytes:
        rows = [json.loads(x) for x in text.splitlines()]
        for row in rows:
            row.update(label="mine", meta={"a": [1, 2]}, Temperature=7)
        return lines(rows).encode()

    def mixed_id_check(c: CaseDir, r: Result) -> str | None:
        if r.code != 0:
            return None
        rows = c.read_jsonl("out.jsonl")
        ids = [row["id"] for row in rows]
        if ids != [1, "1"]:
            return f"ids came back as {ids!r}, not [1, '1']"
        ref = list(c.fx.reference.values())
        if [row["output_ids"] for row in rows] != ref[:2]:
            return "silent wrong output for mixed-type ids"
        return None

    openai = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hello", "max_tokens": 3}}

    def oa(**changes):
        row = json.loads(json.dumps(openai))
        for key, value in changes.items():
            if key.startswith("body_"):
                if value is ...:
                    row["body"].pop(key[5:], None)
                else:
                    row["body"][key[5:]] = value
            elif value is ...:
                row.pop(key, None)
            else:
                row[key] = value
        return lines([row])

    return [
        derived("non-utf8", lambda t: t.encode().replace(b'"p2"', b'"p\xff2"'), expect="user"),
        derived("latin1-prompt", lambda t: b'{"id": 1, "prompt": "caf\xe9"}\n', expect="user"),
        derived("bom", lambda t: b"\xef\xbb\xbf" + t.encode()),
        derived("crlf", lambda t: t.replace("\n", "\r\n").encode()),
        derived("blank-lines", lambda t: ("\n\n" + t.replace("\n", "\n   \n")).encode()),
        derived("no-final-newline", lambda t: t.rstrip("\n").encode()),
        derived("duplicate-ids", dup_id, expect="user"),
        derived("mixed-type-ids", mixed_ids, check=mixed_id_check),
        derived("unknown-fields", unknown_fields),
        derived("nul-byte", lambda t: t.encode().replace(b"}\n", b"}\x00\n", 1), expect="user"),
        bad_input("lone-surrogate-id", '{"id": "a\\ud800", "input_ids": [5, 6]}\n'),
        bad_input("lone-surrogate-prompt", '{"id": 1, "prompt": "x\\udfff y"}\n'),
        bad_input("lone-surrogate-in-own-field", '{"id": 1, "input_ids": [5], "meta": {"k": "\\ud83d"}}\n'),
        bad_input("openai-lone-surrogate-custom-id", '{"custom_id": "a\\ud800", "method": "POST", "url": '
                  '"/v1/completions", "body": {"prompt": "hi"}}\n'),
        # a key of the user's own named like an OpenAI one (the page a prompt is about) is not a format switch
        derived("native-with-url-key", lambda t: lines({**row, "url": "https://example.com", "method": "GET"}
                                                       for row in map(json.loads, t.splitlines())).encode()),
        bad_input("openai-prompt-outside-body", oa(body=..., prompt="hi")),
        bad_input("empty-file", ""),
        bad_input("only-blank-lines", "\n\n  \n"),
        bad_input("json-array-line", "[1, 2, 3]\n"),
        bad_input("id-float", lines([{"id": 1.5, "input_ids": [5, 6]}])),
        bad_input("id-bool", lines([{"id": True, "input_ids": [5, 6]}])),
        bad_input("id-huge-int", '{"id": ' + "9" * 5000 + ', "input_ids": [5, 6]}\n'),
        bad_input("deep-nesting", '{"id": 1, "input_ids": [5], "x": ' + "[" * 100000 + "]" * 100000 + "}\n"),
        bad_input("empty-prompt", lines([{"id": 1, "prompt": ""}])),
        bad_input("empty-input-ids", lines([{"id": 1, "input_ids": []}])),
        bad_input("input-ids-outside-vocab", lines([{"id": 1, "input_ids": [5, 100000]}])),
        bad_input("input-ids-strings", lines([{"id": 1, "input_ids": ["5", "6"]}])),
        bad_input("max-new-tokens-string", lines([{"id": 1, "input_ids": [5], "max_new_tokens": "5"}])),
        bad_input("max-new-tokens-zero", lines([{"id": 1, "input_ids": [5], "max_new_tokens": 0}])),
        bad_input("temperature-nan", '{"id": 1, "input_ids": [5], "temperature": NaN}\n'),
        bad_input("duplicate-key", '{"id": 1, "id": 2, "input_ids": [5]}\n'),
        bad_input("huge-line", lines([{"id": 1, "prompt": "word " * 400_000}]), timeout=120),
        bad_input("mixed-formats", lines([{"id": 1, "input_ids": [5]}, json.loads(oa())])),
        bad_input("openai-no-body", oa(body=...)),
        bad_input("openai-body-string", oa(body="hello")),
        bad_input("openai-method-get", oa(method="GET")),
        bad_input("openai-bad-url", oa(url="/v1/embeddings")),
        bad_input("openai-no-custom-id", oa(custom_id=...)),
        bad_input("openai-n-2", oa(body_n=2)),
        bad_input("openai-logprobs", oa(body_logprobs=True)),
        bad_input("openai-unknown-body-field", oa(body_frequency_penalty_x=1)),
        bad_input("openai-chat-without-template", oa(url="/v1/chat/completions", body_prompt=...,
                                                     body_messages=[{"role": "user", "content": "hi"}])),
        bad_input("openai-messages-on-completions", oa(body_messages=[{"role": "user", "content": "hi"}])),
        bad_input("openai-max-tokens-negative", oa(body_max_tokens=-1)),
        Case("input-openai-good", "input", "ok", setup=write_input(oa()), argv=lambda c: job(c, "in.jsonl"),
             check=lambda c, r: None if r.code or c.read_jsonl("out.jsonl")[0]["custom_id"] == "a" else "bad custom_id"),
        Case("input-is-folder", "input", "user", argv=lambda c: job(c, c.d)),
        Case("input-fifo", "input", "user", setup=fifo("in.jsonl"), argv=lambda c: job(c, "in.jsonl"), timeout=60),
        Case("input-dev-zero", "input", "user", argv=lambda c: job(c, "/dev/zero"), timeout=60),
        Case("input-dev-stdin", "input", "user", argv=lambda c: job(c, "/dev/stdin"), timeout=60),
        Case("input-missing", "input", "user", argv=lambda c: job(c, "nope.jsonl")),
        Case("input-symlink", "input", "ok", setup=lambda c: (c.d / "in.jsonl").symlink_to(c.fx.good),
             argv=lambda c: job(c, "in.jsonl"), check=matches_reference()),
        Case("input-unreadable", "input", "user", setup=_unreadable_input, argv=lambda c: job(c, "in.jsonl")),
    ]


def _unreadable_input(c: CaseDir) -> None:
    """A job file the process cannot read: chmod 000 does not stop root, so read it through a
    folder it cannot search as user nobody... simpler: a file on a tmpfs mounted noexec does
    not help either; we use a path component that is a file."""
    c.write("in.jsonl", c.fx.good.read_text())
    os.chmod(c.d / "in.jsonl", 0)
    if os.geteuid() == 0:
        raise Skip("root reads a mode-000 file")


def output_cases() -> list[Case]:
    def protected(name: str, text: str = "the user's file\n"):
        def setup(c: CaseDir) -> None:
            c.write(name, text)

        return setup

    def symlink_to_victim(name: str):
        def setup(c: CaseDir) -> None:
            victim = c.write("victim.txt", "the user's precious file\n")
            (c.d / name).symlink_to(victim)

        return setup

    def readonly_folder(c: CaseDir) -> None:
        mount = c.mount_tmpfs("ro", "size=1m")
        (mount / "keep.txt").write_text("x")
        c.remount_ro(mount)

    def full_disk(c: CaseDir) -> None:
        mount = c.mount_tmpfs("full", "size=16k")
        try:
            (mount / "filler").write_bytes(b"x" * (16 << 10))
        except OSError:
            pass

    return [
        Case("output-is-folder", "output", "user", setup=lambda c: (c.d / "o").mkdir(),
             argv=lambda c: good_job(c, output="o")),
        Case("output-trailing-slash", "output", "user", argv=lambda c: good_job(c, output="newdir/")),
        Case("output-dev-null", "output", "user", argv=lambda c: good_job(c, output="/dev/null")),
        Case("output-dev-full", "output", "user", argv=lambda c: good_job(c, output="/dev/full")),
        Case("output-fifo", "output", "user", setup=fifo("o.jsonl"), argv=lambda c: good_job(c, output="o.jsonl"), timeout=60),
        Case("output-symlink", "output", "user", setup=symlink_to_victim("o.jsonl"), argv=lambda c: good_job(c, output="o.jsonl")),
        Case("output-partial-symlink", "output", "user", setup=symlink_to_victim("o.jsonl.partial"),
             argv=lambda c: good_job(c, output="o.jsonl")),
        Case("output-missing-folder", "output", "user", argv=lambda c: good_job(c, output="no/such/o.jsonl")),
        Case("output-read-only-folder", "output", "user", setup=readonly_folder, argv=lambda c: good_job(c, output="ro/o.jsonl")),
        Case("output-same-as-input", "output", "user", setup=protected("in.jsonl", ""),
             argv=lambda c: job(c, "in.jsonl", output="in.jsonl")),
        Case("output-same-as-input-via-link", "output", "user",
             setup=lambda c: (c.write("in.jsonl", c.fx.good.read_text()), os.link(c.d / "in.jsonl", c.d / "o.jsonl")),
             argv=lambda c: job(c, "in.jsonl", output="o.jsonl")),
        Case("output-exists", "output", "user", setup=protected("o.jsonl"), argv=lambda c: good_job(c, output="o.jsonl")),
        Case("output-exists-overwrite", "output", "ok", setup=protected("o.jsonl"), owns=("o.jsonl",),
             argv=lambda c: good_job(c, "--overwrite", output="o.jsonl"), check=matches_reference("o.jsonl")),
        Case("output-empty-string", "output", "user", argv=lambda c: good_job(c, output="")),
        # a file that cannot be replaced (chattr +i, or another user's in a sticky folder) was found after the run
        Case("output-immutable-overwrite", "output", "user", setup=immutable("o.jsonl"),
             argv=lambda c: good_job(c, "--overwrite", output="o.jsonl"), check=nothing_written("o.jsonl.partial")),
        Case("stats-json-immutable", "output", "user", setup=immutable("s.json", "{}\n"),
             argv=lambda c: good_job(c, "--stats-json", "s.json"), check=nothing_written("out.jsonl")),
        # the job's own progress files beside the model must not make the model "differ"
        Case("output-in-model-folder-resume", "output", "ok", setup=in_model_folder_setup, argv=in_model_folder_job,
             owns=("model/out.jsonl*",), check=in_model_folder_check, timeout=240),
        Case("output-disk-full", "output", "env", setup=full_disk, argv=lambda c: good_job(c, output="full/o.jsonl")),
        Case("output-stdout", "output", "ok", argv=lambda c: good_job(c, output="-"),
             check=lambda c, r: None if r.code or r.stdout.count('"output_ids"') == 6 else "stdout lacks the 6 results"),
        Case("trace-missing-folder", "output", "user", argv=lambda c: good_job(c, "--trace", "no/such/t.json"),
             check=nothing_written("out.jsonl")),
        Case("trace-is-folder", "output", "user", setup=lambda c: (c.d / "t").mkdir(),
             argv=lambda c: good_job(c, "--trace", "t"), check=nothing_written("out.jsonl")),
        Case("trace-same-as-input", "output", "user", setup=lambda c: c.write("in.jsonl", c.fx.good.read_text()),
             argv=lambda c: job(c, "in.jsonl", "--trace", "in.jsonl")),
        Case("trace-symlink", "output", "user", setup=symlink_to_victim("t.json"), argv=lambda c: good_job(c, "--trace", "t.json")),
        Case("stats-json-missing-folder", "output", "user", argv=lambda c: good_job(c, "--stats-json", "no/such/s.json"),
             check=nothing_written("out.jsonl")),
        Case("stats-json-same-as-input", "output", "user", setup=lambda c: c.write("in.jsonl", c.fx.good.read_text()),
             argv=lambda c: job(c, "in.jsonl", "--stats-json", "in.jsonl")),
        Case("stats-json-same-as-output", "output", "user", argv=lambda c: good_job(c, "--stats-json", "out.jsonl")),
        Case("stats-json-symlink", "output", "user", setup=symlink_to_victim("s.json"),
             argv=lambda c: good_job(c, "--stats-json", "s.json")),
        Case("stats-json-dev-full", "output", "user|env", argv=lambda c: good_job(c, "--stats-json", "/dev/full")),
    ]


def offload_cases() -> list[Case]:
    def disk_job(c: CaseDir, *extra) -> list[str]:
        return good_job(c, *DISK, "--offload-dir", "off", *extra)

    def small_tmpfs(c: CaseDir) -> None:
        c.mount_tmpfs("off", "size=1m")

    def readonly_offload(c: CaseDir) -> None:
        mount = c.mount_tmpfs("off", "size=4m")
        c.remount_ro(mount)

    def bundled_disk_job(c: CaseDir) -> list[str]:
        return RUN + s("--prompt-len", 4, "--num-prompts", 2, "--max-new-tokens", 2, *DISK, "--offload-dir", "off", *FAST)

    return [
        Case("offload-none-given", "offload", "user", argv=lambda c: good_job(c, *DISK), check=nothing_written("out.jsonl")),
        Case("offload-is-file", "offload", "user", setup=lambda c: c.write("off", "precious\n"), argv=disk_job),
        Case("offload-dev-null", "offload", "user", argv=lambda c: good_job(c, *DISK, "--offload-dir", "/dev/null")),
        Case("offload-read-only", "offload", "user", setup=readonly_offload, argv=disk_job),
        Case("offload-no-space", "offload", "user|env", setup=small_tmpfs, argv=bundled_disk_job),
        Case("offload-owned-by-nobody", "offload", "user", setup=offload_then(chown_nobody), argv=disk_job,
             owns=("off/*",)),
        Case("offload-group-writable", "offload", "user", setup=offload_then(group_writable), argv=disk_job,
             owns=("off/*",)),
        Case("offload-symlink-planted", "offload", "ok", setup=offload_then(planted_symlink), argv=disk_job,
             owns=("off/*",), check=matches_reference()),
        Case("offload-torn-weight", "offload", "ok", setup=offload_then(torn_weight), argv=disk_job,
             owns=("off/*",), check=matches_reference()),
        Case("offload-corrupt-verify", "offload", "ok", setup=offload_then(corrupt_same_size_same_mtime),
             argv=lambda c: disk_job(c, "--verify-offload"), owns=("off/*",), check=matches_reference()),
        Case("offload-entry-fifo", "offload", "ok", setup=offload_then(planted_entry_fifo), argv=disk_job,
             owns=("off/*",), check=matches_reference(), timeout=60),
        Case("offload-entry-garbage", "offload", "ok", setup=offload_then(garbage_entry), argv=disk_job,
             owns=("off/*",), check=matches_reference()),
        Case("offload-stale-temp", "offload", "ok", setup=offload_then(stale_temp), argv=disk_job,
             owns=("off/*",), check=matches_reference()),
        Case("offload-weights-folder-symlink", "offload", "user", setup=offload_then(weights_folder_is_symlink),
             argv=disk_job, owns=("off/*",)),
        Case("offload-dir-symlink-to-folder", "offload", "ok",
             setup=lambda c: ((c.d / "real").mkdir(), (c.d / "off").symlink_to(c.d / "real")),
             argv=disk_job, owns=("real/*",), check=matches_reference()),
        Case("offload-kv-cache-on-disk", "offload", "ok",
             argv=lambda c: good_job(c, "--percent", "100", "0", "0", "0", "100", "0", "--offload-dir", "off"),
             check=matches_reference()),
    ]


def env_cases() -> list[Case]:
    def ro_home(c: CaseDir) -> None:
        mount = c.mount_tmpfs("home", "size=1m")
        c.remount_ro(mount)

    def cache_garbage(c: CaseDir) -> None:
        cache = c.d / "cache"
        cache.mkdir()
        src = Path(c.data["env"]["FLEXGEN_CACHE_DIR"])
        for path in src.glob("hardware-*.json") if src.is_dir() else ():
            (cache / path.name).write_text("{garbage")
        if not list(cache.iterdir()):
            import socket as _socket

            (cache / f"hardware-{_socket.gethostname()}-cpu-float32-tmp.json").write_text("{garbage")

    return [
        Case("env-rlimit-as-tiny", "env", "env", lambda c: good_job(c), rlimit_as=400 << 20),
        Case("env-rlimit-as-run", "env", "ok|env|user",
             lambda c: tiny(c, "--policy", "manual", "--gpu-batch-size", 4096, "--prompt-len", 64), rlimit_as=3 << 30),
        Case("env-cgroup-small", "env", "ok|env|user", lambda c: RUN + s("--max-new-tokens", 4, *FAST), cgroup_bytes=180 << 20,
             timeout=180),
        Case("env-sigterm-mid-run", "env", "sig", setup=signal_job_setup, argv=signal_job,
             signal_when=(signal.SIGTERM, partial_nonempty), check=interrupted_check, timeout=180),
        Case("env-sigint-mid-run", "env", "sig", setup=signal_job_setup, argv=signal_job,
             signal_when=(signal.SIGINT, partial_nonempty), check=interrupted_check, timeout=180),
        Case("env-sigint-at-start", "env", "sig", setup=signal_job_setup, argv=signal_job,
             signal_when=(signal.SIGINT, lambda c: _waited(c, 0.4)), timeout=60),
        Case("env-sigterm-at-start", "env", "sig", setup=signal_job_setup, argv=signal_job,
             signal_when=(signal.SIGTERM, lambda c: _waited(c, 0.4)), timeout=60),
        Case("env-sigterm-overwrite-run", "env", "sig", setup=overwrite_then_interrupted,
             argv=lambda c: signal_job(c) + ["--overwrite"], owns=("out.jsonl*",),
             signal_when=(signal.SIGTERM, partial_nonempty),
             check=lambda c, r: None if r.code not in (130, 143) or "again without --overwrite to resume" in r.message
             else "the line tells to rerun with --overwrite, which would discard the saved results", timeout=180),
        Case("env-resume-after-sigterm", "env", "ok", setup=sigterm_then_resume,
             argv=signal_job, owns=("out.jsonl*",), check=resumed_check, timeout=240),
        Case("env-read-only-home", "env", "ok", setup=ro_home, env=lambda c: {"HOME": str(c.d / "home"), "FLEXGEN_CACHE_DIR": None},
             argv=lambda c: tiny(c)),
        Case("env-cache-dir-is-file", "env", "ok|user", setup=lambda c: c.write("cachefile", "x"),
             env=lambda c: {"FLEXGEN_CACHE_DIR": str(c.d / "cachefile")}, argv=lambda c: tiny(c), owns=("cachefile",)),
        Case("env-cache-garbage", "env", "ok", setup=cache_garbage, env=lambda c: {"FLEXGEN_CACHE_DIR": str(c.d / "cache")},
             argv=lambda c: tiny(c), owns=("cache/*",)),
        Case("env-tmpdir-missing", "env", "ok|user", env={"TMPDIR": "/nonexistent/tmp"}, argv=lambda c: tiny(c)),
    ]


def _waited(c: CaseDir, seconds: float) -> bool:
    start = c.data.setdefault("t0", time.monotonic())
    return time.monotonic() - start >= seconds


def dist_cases() -> list[Case]:
    def peerless(rank: int):
        return lambda c: {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
                          "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}

    def at_other_service(c: CaseDir) -> dict:  # rank 1, its MASTER_PORT held by an unrelated service
        return {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(c.data["port"])}

    return [
        Case("dist-rank-without-world-size", "dist", "user", env={"RANK": "0"}, argv=lambda c: tiny(c)),
        Case("dist-world-size-without-rank", "dist", "user", env={"WORLD_SIZE": "2"}, argv=lambda c: tiny(c)),
        Case("dist-rank-past-world", "dist", "user", env={"RANK": "3", "WORLD_SIZE": "2"}, argv=lambda c: tiny(c)),
        Case("dist-world-size-text", "dist", "user", env={"RANK": "0", "WORLD_SIZE": "two"}, argv=lambda c: tiny(c)),
        Case("dist-master-port-bad", "dist", "user", env={"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "99999"},
             argv=lambda c: tiny(c)),
        Case("dist-no-peer-rank0", "dist", "env", env=peerless(0), argv=lambda c: tiny(c, "--comm-timeout", 3), timeout=90),
        Case("dist-no-peer-rank1", "dist", "env", env=peerless(1), argv=lambda c: tiny(c, "--comm-timeout", 3), timeout=90),
        # it accepts, then never answers (or answers garbage): c10d's client waited forever, deaf to SIGTERM
        Case("dist-master-port-silent-service", "dist", "env", setup=other_service(None), env=at_other_service,
             argv=lambda c: tiny(c, "--comm-timeout", 3), timeout=90),
        Case("dist-master-port-garbage-service", "dist", "env", setup=other_service(b"HTTP/1.0 400 Bad Request\r\n\r\n"),
             env=at_other_service, argv=lambda c: tiny(c, "--comm-timeout", 3), timeout=90),
        # rank 0 stops (SIGSTOP) after the roll call: gloo's connect waited forever in C++, deaf to SIGTERM
        Case("dist-rank0-frozen-mid-rendezvous", "dist", "env", setup=frozen_rank0, env=at_other_service,
             argv=lambda c: tiny(c, "--comm-timeout", 3), timeout=90),
        Case("dist-ompi-rank-without-size", "dist", "user", env={"OMPI_COMM_WORLD_RANK": "0"}, argv=lambda c: tiny(c)),
        # a plain `sbatch job.sh` without --ntasks: slurmstepd sets SLURM_PROCID=0 and no SLURM_NTASKS
        Case("dist-slurm-procid-without-ntasks", "dist", "ok", env={"SLURM_PROCID": "0", "SLURM_JOB_ID": "7"},
             argv=lambda c: tiny(c)),
        Case("dist-slurm-array-without-count", "dist", "user", env={"SLURM_ARRAY_TASK_ID": "1"},
             argv=lambda c: good_job(c)),
        Case("dist-eval-with-ranks", "dist", "user", env=peerless(0), argv=lambda c: EVAL + s("--comm-timeout", 3), timeout=90),
    ]


def other_command_cases() -> list[Case]:
    def text_file(content: bytes):
        return write_input(content, "t.txt")

    def eval_tiny(c: CaseDir, *extra) -> list[str]:
        return EVAL + s("--model", c.fx.llama, "--max-tokens", 64, *extra)

    return [
        # eval
        Case("eval-window-one", "eval", "user", lambda c: eval_tiny(c, "--window", 1)),
        Case("eval-window-zero", "eval", "user", lambda c: eval_tiny(c, "--window", 0)),
        Case("eval-window-negative", "eval", "user", lambda c: eval_tiny(c, "--window", -3)),
        Case("eval-max-tokens-zero", "eval", "user", lambda c: EVAL + s("--model", c.fx.llama, "--max-tokens", 0)),
        Case("eval-max-tokens-negative", "eval", "user", lambda c: EVAL + s("--model", c.fx.llama, "--max-tokens", -5)),
        Case("eval-text-missing", "eval", "user", lambda c: eval_tiny(c, "--text", "nope.txt")),
        Case("eval-text-not-utf8", "eval", "user", setup=text_file(b"caf\xe9 au lait " * 20), argv=lambda c: eval_tiny(c, "--text", "t.txt")),
        Case("eval-text-empty", "eval", "user", setup=text_file(b""), argv=lambda c: eval_tiny(c, "--text", "t.txt")),
        Case("eval-text-one-char", "eval", "user", setup=text_file(b"x"), argv=lambda c: eval_tiny(c, "--text", "t.txt")),
        Case("eval-text-folder", "eval", "user", lambda c: eval_tiny(c, "--text", c.d)),
        Case("eval-text-fifo", "eval", "user", setup=fifo("t.txt"), argv=lambda c: eval_tiny(c, "--text", "t.txt"), timeout=60),
        Case("eval-text-dev-zero", "eval", "user", lambda c: eval_tiny(c, "--text", "/dev/zero"), timeout=60),
        Case("eval-no-tokenizer", "eval", "user", lambda c: EVAL + s("--model", c.fx.opt)),
        Case("eval-percent-past-gpu-mem", "eval", "user",
             lambda c: eval_tiny(c, "--percent", "100", "0", "100", "0", "100", "0", "--gpu-mem", "4K")),
        # a given policy that fits the capacities runs (checked against them, not refused for being given)
        Case("eval-percent-within-gpu-mem", "eval", "ok",
             lambda c: eval_tiny(c, "--percent", "100", "0", "100", "0", "100", "0", "--gpu-mem", "1G"),
             check=stdout_has("perplexity:")),
        Case("eval-good", "eval", "ok", setup=text_file(b"hello world, this is a test of the evaluation. " * 4),
             argv=lambda c: eval_tiny(c, "--text", "t.txt"), check=stdout_has("perplexity:")),
        # merge
        Case("merge-good", "merge", "ok", setup=merge_setup(), argv=lambda c: MERGE + s("--input", "in.jsonl", "out.jsonl"),
             check=lambda c, r: None if r.code or [x["id"] for x in c.read_jsonl("out.jsonl")] == [0, 1, 2, 3] else "wrong order"),
        Case("merge-missing-shard", "merge", "user", setup=merge_setup(missing=1),
             argv=lambda c: MERGE + s("--input", "in.jsonl", "out.jsonl"), check=nothing_written("out.jsonl")),
        Case("merge-duplicate-id", "merge", "user", setup=merge_setup(duplicate=True),
             argv=lambda c: MERGE + s("--input", "in.jsonl", "out.jsonl"), check=nothing_written("out.jsonl")),
        Case("merge-foreign-id", "merge", "user", setup=merge_setup(foreign=True),
             argv=lambda c: MERGE + s("--input", "in.jsonl", "out.jsonl"), check=nothing_written("out.jsonl")),
        Case("merge-garbage-shard", "merge", "user", setup=merge_setup(garbage=True),
             argv=lambda c: MERGE + s("--input", "in.jsonl", "out.jsonl"), check=nothing_written("out.jsonl")),
        Case("merge-output-is-input", "merge", "user", setup=merge_setup(),
             argv=lambda c: MERGE + s("--input", "in.jsonl", "in.jsonl", "out.shard-0-of-2.jsonl", "out.shard-1-of-2.jsonl")),
        Case("merge-output-exists", "merge", "user", setup=lambda c: (merge_setup()(c), c.write("out.jsonl", "mine\n")),
             argv=lambda c: MERGE + s("--input", "in.jsonl", "out.jsonl")),
        Case("merge-output-is-shard", "merge", "user", setup=merge_setup(),
             argv=lambda c: MERGE + s("--input", "in.jsonl", "--overwrite", "out.shard-0-of-2.jsonl",
                                      "out.shard-0-of-2.jsonl", "out.shard-1-of-2.jsonl")),
        Case("merge-input-missing", "merge", "user", setup=merge_setup(),
             argv=lambda c: MERGE + s("--input", "nope.jsonl", "out.jsonl")),
        Case("merge-no-input-flag", "merge", "user", setup=merge_setup(), argv=lambda c: MERGE + s("out.jsonl")),
        Case("merge-shard-fifo", "merge", "user", setup=lambda c: (merge_setup()(c), os.mkfifo(c.d / "f.jsonl")),
             argv=lambda c: MERGE + s("--input", "in.jsonl", "out.jsonl", "out.shard-0-of-2.jsonl", "f.jsonl"), timeout=60),
        Case("merge-output-folder", "merge", "user", setup=lambda c: (merge_setup()(c), (c.d / "m").mkdir()),
             argv=lambda c: MERGE + s("--input", "in.jsonl", "m", "out.shard-0-of-2.jsonl", "out.shard-1-of-2.jsonl")),
        Case("merge-output-symlink", "merge", "user",
             setup=lambda c: (merge_setup()(c), c.write("victim.txt", "precious\n"), (c.d / "m.jsonl").symlink_to(c.d / "victim.txt")),
             argv=lambda c: MERGE + s("--input", "in.jsonl", "--overwrite", "m.jsonl", "out.shard-0-of-2.jsonl",
                                      "out.shard-1-of-2.jsonl")),
        # profile
        Case("profile-device-unknown", "profile", "user", lambda c: PROFILE + s("--quick", "--device", "tpu")),
        Case("profile-device-cuda", "profile", "user", lambda c: PROFILE + s("--quick", "--device", "cuda")),
        Case("profile-dtype-int8", "profile", "user", lambda c: PROFILE + s("--quick", "--dtype", "int8")),
        Case("profile-offload-missing", "profile", "user", lambda c: PROFILE + s("--quick", "--offload-dir", "nope/deeper")),
        Case("profile-offload-is-file", "profile", "user", setup=lambda c: c.write("f", "precious\n"),
             argv=lambda c: PROFILE + s("--quick", "--offload-dir", "f")),
        Case("profile-out-missing-folder", "profile", "user", lambda c: PROFILE + s("--quick", "--out", "no/such/hw.json")),
        Case("profile-out-folder", "profile", "user", setup=lambda c: (c.d / "hw").mkdir(),
             argv=lambda c: PROFILE + s("--quick", "--out", "hw")),
        Case("profile-out-symlink", "profile", "user",
             setup=lambda c: (c.write("victim.txt", "precious\n"), (c.d / "hw.json").symlink_to(c.d / "victim.txt")),
             argv=lambda c: PROFILE + s("--quick", "--out", "hw.json")),
        Case("profile-offload-read-only", "profile", "user|env",
             setup=lambda c: c.remount_ro(c.mount_tmpfs("ro", "size=1m")),
             argv=lambda c: PROFILE + s("--quick", "--offload-dir", "ro")),
        # bench (cheap: refused before anything runs)
        Case("bench-systems-unknown", "bench", "user", lambda c: BENCH + s("--systems", "ours,vllm")),
        Case("bench-blocks-zero", "bench", "user", lambda c: BENCH + s("--blocks", "0x1")),
        Case("bench-batches-text", "bench", "user", lambda c: BENCH + s("--batches", "a,b")),
        Case("bench-ranks-zero", "bench", "user", lambda c: BENCH + s("--ranks", "0")),
        Case("bench-ranks-and-sweep", "bench", "user", lambda c: BENCH + s("--ranks", "1,2", "--sweep")),
        Case("bench-shape-unknown", "bench", "user", lambda c: BENCH + s("--shape", "opt-9000b", "--offload-dir", "b")),
        Case("bench-model-and-shape", "bench", "user", lambda c: BENCH + s("--model", c.fx.llama, "--shape", "opt-125m")),
        Case("bench-mem-limit-text", "bench", "user", lambda c: BENCH + s("--mem-limit", "lots", "--offload-dir", "b")),
        Case("bench-mem-limit-too-small", "bench", "user", lambda c: BENCH + s("--mem-limit", "1G", "--offload-dir", "b")),
        Case("bench-prompt-len-negative", "bench", "user",
             lambda c: BENCH + s("--prompt-len", -1, "--systems", "ours", "--blocks", "1x1", "--offload-dir", "b"), timeout=90),
        Case("bench-gen-len-zero", "bench", "user",
             lambda c: BENCH + s("--gen-len", 0, "--systems", "ours", "--blocks", "1x1", "--offload-dir", "b"), timeout=90),
        Case("bench-json-missing-folder", "bench", "user",
             lambda c: BENCH + s("--systems", "ours", "--blocks", "1x1", "--prompt-len", 4, "--gen-len", 2,
                                 "--offload-dir", "b", "--json", "no/such/r.json"), timeout=180),
        Case("bench-default-temp-folder", "bench", "user", lambda c: BENCH + s("--systems", "ours", "--blocks", "0x0")),
        Case("bench-cores-zero", "bench", "user", lambda c: BENCH + s("--ranks", "1", "--cores", "0", "--offload-dir", "b"),
             timeout=90),
    ]


def stream_cases() -> list[Case]:
    """Standard output that fails: closed, a reader that goes away, a full disk, ASCII only."""
    from hostile_setups import message_has

    text = ["--prompt", "héllo wörld", "--prompt", "naïve café"]
    return [
        Case("stdout-closed-prints-results", "stdout", "user", argv=lambda c: stdout_closed(tiny(c))),
        Case("stdout-closed-dash-output", "stdout", "user", argv=lambda c: stdout_closed(good_job(c, output="-")),
             check=message_has("standard output is closed")),
        Case("stdout-closed-file-output", "stdout", "ok", argv=lambda c: stdout_closed(good_job(c)),
             check=matches_reference()),
        Case("stdout-broken-pipe-prints-results", "stdout", "ok|pipe", argv=lambda c: stdout_head_1(tiny(c)),
             check=quiet_stderr),
        Case("stdout-broken-pipe-file-output", "stdout", "ok|pipe", argv=lambda c: stdout_head_1(good_job(c)),
             check=lambda c, r: quiet_stderr(c, r) or complete_output()(c, r)),
        Case("stdout-dev-full", "stdout", "env", argv=lambda c: stdout_to("/dev/full", tiny(c)),
             check=message_has("cannot write to standard output: No space left on device")),
        Case("stdout-dev-full-dash-output", "stdout", "env", argv=lambda c: stdout_to("/dev/full", good_job(c, output="-"))),
        Case("stdout-dev-full-file-output", "stdout", "env", argv=lambda c: stdout_to("/dev/full", good_job(c)),
             owns=("out.jsonl*",)),
        Case("stdout-ascii-encoding", "stdout", "ok", env={"PYTHONIOENCODING": "ascii"},
             argv=lambda c: RUN + s("--model", c.fx.llama, "--max-new-tokens", 2, *FAST, *text),
             check=stdout_has("'h\\xe9llo w\\xf6rld' -> ")),
        Case("stdout-ascii-encoding-dash-output", "stdout", "ok", env={"PYTHONIOENCODING": "ascii"},
             setup=write_input(lines({"id": f"é{i}", "prompt": p} for i, p in enumerate(text[1::2]))),
             argv=lambda c: job(c, "in.jsonl", output="-"),
             check=lambda c, r: None if r.code or ('"id": "\\u00e90"' in r.stdout and r.stdout.isascii())
             else "the JSON lines are not escaped"),
        Case("stdout-lc-all-c", "stdout", "ok", env={"LC_ALL": "C", "LANG": "C"},
             argv=lambda c: RUN + s("--model", c.fx.llama, "--max-new-tokens", 2, *FAST, *text)),
    ]


def progress_file_cases() -> list[Case]:
    """Progress files are input too; merge checks which runs made its shards; scratch of dead runs."""
    from hostile_setups import message_has

    def merge(c: CaseDir) -> list[str]:
        return MERGE + s("--input", "in.jsonl", "out.jsonl")

    return [
        Case("partial-id-not-in-input", "progress", "user", setup=unfinished_job(partial_foreign_id),
             argv=lambda c: good_job(c), check=message_has("out.jsonl.partial:3: id \"not-in-input\" is not in")),
        Case("partial-edited-line", "progress", "user", setup=unfinished_job(partial_edited_line),
             argv=lambda c: good_job(c), check=message_has("out.jsonl.partial:2: not a result line")),
        Case("partial-foreign-line-removed-resumes", "progress", "ok", setup=unfinished_job(partial_fixed),
             argv=lambda c: good_job(c), owns=("out.jsonl*",), check=matches_reference()),
        Case("run-json-settings-a-list", "progress", "user", setup=unfinished_job(record_field("settings", [])),
             argv=lambda c: good_job(c), check=message_has("out.jsonl.run.json:", "'settings' is a list")),
        Case("run-json-started-at-text", "progress", "user",
             setup=unfinished_job(record_field("started_at", "yesterday")), argv=lambda c: good_job(c)),
        Case("run-json-model-number", "progress", "user", setup=unfinished_job(record_field("model", 5)),
             argv=lambda c: good_job(c)),
        Case("merge-made-by-one-run", "merge", "ok", setup=merge_made_by(), argv=merge),
        Case("merge-other-settings", "merge", "user", setup=merge_made_by(odd={"settings": {"max_new_tokens": 8}}),
             argv=merge, check=message_has("out.shard-1-of-2.jsonl and", "max_new_tokens differs")),
        Case("merge-other-model", "merge", "user", setup=merge_made_by(odd={"model": "n" * 64}), argv=merge,
             check=message_has("the model differs")),
        Case("merge-other-output-format", "merge", "user", setup=merge_made_by(odd={"output_format": "openai"}),
             argv=merge),
        Case("merge-older-input", "merge", "user", setup=merge_made_by(old_input=True), argv=merge,
             check=message_has("another version of 'in.jsonl'")),
        Case("merge-record-wrong-type", "merge", "user", setup=merge_made_by(damaged=True), argv=merge),
        Case("merge-record-missing-for-one", "merge", "user", setup=merge_made_by(only_one=True), argv=merge),
        Case("merge-stdout-dev-full", "merge", "env", setup=merge_made_by(), argv=lambda c: stdout_to("/dev/full", merge(c)),
             owns=("out.jsonl",)),
        Case("merge-stdout-closed", "merge", "ok", setup=merge_made_by(), argv=lambda c: stdout_closed(merge(c)),
             check=lambda c, r: None if r.code or len(c.read_jsonl("out.jsonl")) == 4 else "the merged file is not whole"),
        Case("offload-stale-kv-scratch", "offload", "ok", setup=stale_kv_scratch, owns=("off/*",),
             argv=lambda c: good_job(c, "--percent", "100", "0", "0", "0", "100", "0", "--offload-dir", "off"),
             check=stale_kv_scratch_removed),
    ]


def all_cases() -> list[Case]:
    return flag_cases() + model_cases() + input_cases() + output_cases() + offload_cases() + env_cases() + \
        dist_cases() + other_command_cases() + stream_cases() + progress_file_cases()
