"""Job files: every bad line is refused with `path:line:` and a hint; good lines become Requests;
OpenAI batch files round-trip into OpenAI's output shape; the token pass checks vocabulary and
positions. Pure Python: no model, no torch."""

import json

import pytest

from flexgen_dist.errors import UserError
from flexgen_dist.jobs.inputs import JobFileScanner, read_job_file
from flexgen_dist.jobs.requests import CHAT_URL, COMPLETIONS_URL, check_tokens
from flexgen_dist.api.results import Output
from flexgen_dist.jobs.outputs import output_row, row_key

GOOD = {"id": "ok", "prompt": "fine"}


def write_lines(tmp_path, lines, name="in.jsonl"):
    path = tmp_path / name
    data = b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)
    path.write_bytes(data)
    return path


def refused(path, line_no, fragment):
    with pytest.raises(UserError) as info:
        read_job_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line_no}: "), message
    assert fragment in message, message
    assert "\n" not in message
    return message


def openai(custom_id="c1", url=COMPLETIONS_URL, **body):
    body = body or {"prompt": "hello"}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


NATIVE_BAD = [
    ({"id": 1, "prompt": "x", "temperature": -0.5}, "must be >= 0"),
    ({"id": 1, "prompt": "x", "top_p": 0}, "(0, 1]"),
    ({"id": 1, "prompt": "x", "top_p": 1.5}, "(0, 1]"),
    ({"id": 1, "prompt": "x", "max_new_tokens": 0}, "at least 1"),
    ({"id": 1, "prompt": "x", "max_new_tokens": 2.5}, "whole number"),
    ({"id": 1, "prompt": "x", "top_k": -2}, "at least -1"),
    ({"id": 1, "prompt": "x", "seed": -1}, "at least 0"),
    ({"id": 1, "prompt": "x", "stop": ["ok", ""]}, "empty string"),
    ({"id": 1, "prompt": "x", "stop": 5}, "string or a list of strings"),
    ({"id": 1, "prompt": "x", "stop_token_ids": [1, "2"]}, "whole numbers"),
    ({"id": 1, "input_ids": [1, 2.0]}, "token ids are whole numbers"),
    ({"id": 1, "input_ids": [1, True]}, "token ids are whole numbers"),
    ({"id": 1, "input_ids": [1, -3]}, ">= 0"),
    ({"id": 1, "input_ids": []}, "is empty"),
    ({"id": 1, "input_ids": "1 2 3"}, "list of token ids"),
    ({"id": 1}, "needs a 'prompt' (text) or 'input_ids'"),
    ({"id": 1, "prompt": ["a"]}, "'prompt' must be a string"),
    ({"id": 1, "prompt": "x", "input_ids": [1]}, "keep one"),
    ({"id": 1.5, "prompt": "x"}, "string or a whole number"),
    ({"id": [1], "prompt": "x"}, "string or a whole number"),
    ({"id": 1, "prompt": "x", "max_tokens": 5}, "use 'max_new_tokens'"),
    ({"id": 1, "messages": [{"role": "user", "content": "hi"}]}, "OpenAI batch format"),
    (b'{"id": 1, "prompt": "x", "temperature": NaN}', "NaN is not a number JSON allows"),
    (b'{"id": 1, "prompt": "x", "prompt": "y"}', "'prompt' appears twice"),
    (b'{"id": 1, "prompt": "x"', "not valid JSON"),
    (b'[1, 2, 3]', "not an object"),
    (b'"just a string"', "not an object"),
    (b'{"id": 1, "prompt": "caf\xe9"}', "byte 25 of the line is not UTF-8"),
]


@pytest.mark.parametrize("bad, fragment", NATIVE_BAD)
def test_native_bad_line_names_file_and_line(tmp_path, bad, fragment):
    # The bad line is line 3, after a good line and a blank line (blank lines keep their numbers).
    path = write_lines(tmp_path, [GOOD, b"", bad])
    refused(path, 3, fragment)


def test_a_line_nested_too_deeply_is_one_line(tmp_path):
    # json.loads recurses once per level: 100000 levels overflow the stack (RecursionError).
    deep = b"[" * 100_000 + b"]" * 100_000
    path = write_lines(tmp_path, [GOOD, b'{"id": 1, "input_ids": [5], "x": ' + deep + b"}"])
    refused(path, 2, "the JSON is nested too deeply to read")
    path = write_lines(tmp_path, [b'{"custom_id": "a", "body": ' + deep + b"}"], name="batch.jsonl")
    refused(path, 1, "nested too deeply")


OPENAI_BAD = [
    ({**openai(), "method": "GET"}, "use \"POST\""),
    ({**openai(), "url": "/v1/embeddings"}, "is not supported"),
    ({k: v for k, v in openai().items() if k != "custom_id"}, "needs a 'custom_id'"),
    ({**openai(), "custom_id": 3}, "non-empty string"),
    ({**openai(), "body": "hello"}, "'body' must be a JSON object"),
    ({**openai(), "extra": 1}, "unknown key 'extra'"),
    (openai(max_tokens=5), "needs a 'prompt'"),
    (openai(url=CHAT_URL, prompt="x"), "'prompt' belongs to /v1/completions"),
    (openai(url=CHAT_URL, max_tokens=5), "needs 'messages'"),
    (openai(prompt=["a", "b"]), "holds 2 prompts; put one prompt per line"),
    (openai(prompt=[[1, 2], [3]]), "holds 2 prompts"),
    (openai(prompt=5), "string or a list of token ids"),
    (openai(prompt="x", n=2), "'n' = 2 is not supported"),
    (openai(prompt="x", best_of=3), "'best_of' = 3 is not supported"),
    (openai(prompt="x", logprobs=5), "'logprobs' = 5 is not supported"),
    (openai(prompt="x", logprobs=0), "'logprobs' = 0 is not supported"),
    (openai(prompt="x", echo=True), "'echo' = true is not supported"),
    (openai(prompt="x", presence_penalty=0.5), "'presence_penalty' = 0.5 is not supported"),
    (openai(prompt="x", frobnicate=1), "unknown body field 'frobnicate'"),
    (openai(prompt="x", temperature=-1), "must be >= 0"),
    (openai(prompt="x", max_completion_tokens=4), "'max_completion_tokens' belongs to /v1/chat/completions"),
    (openai(url=CHAT_URL, messages=[{"role": "user", "content": "a"}], max_tokens=3, max_completion_tokens=4),
     "both 'max_tokens' and 'max_completion_tokens'"),
    (openai(url=CHAT_URL, messages=[]), "non-empty list"),
    (openai(url=CHAT_URL, messages=[{"role": "user"}]), "needs a 'content' string"),
    (openai(url=CHAT_URL, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "only text content parts"),
    (openai(url=CHAT_URL, messages=[{"role": "user", "content": "a", "tool_calls": []}]), "'tool_calls'"),
]


@pytest.mark.parametrize("bad, fragment", OPENAI_BAD)
def test_openai_bad_line_names_file_and_line(tmp_path, bad, fragment):
    path = write_lines(tmp_path, [openai("first"), bad])
    refused(path, 2, fragment)


def test_duplicate_ids_name_both_lines(tmp_path):
    path = write_lines(tmp_path, [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "a", "prompt": "z"}])
    message = refused(path, 3, 'id "a" is also on line 1')
    assert "unique" in message


def test_a_string_id_and_a_number_id_are_different(tmp_path):
    path = write_lines(tmp_path, [{"id": "7", "prompt": "x"}, {"id": 7, "prompt": "y"}])
    assert [r.key for r in read_job_file(path).requests] == ['"7"', "7"]


def test_default_id_is_the_line_number_and_collides_with_an_explicit_one(tmp_path):
    path = write_lines(tmp_path, [{"id": 2, "prompt": "x"}, {"prompt": "y"}])
    refused(path, 2, "id 2 is also on line 1")


def test_duplicate_custom_ids(tmp_path):
    path = write_lines(tmp_path, [openai("x"), openai("y"), openai("x")])
    refused(path, 3, 'custom_id "x" is also on line 1')


def test_mixing_formats_is_refused(tmp_path):
    path = write_lines(tmp_path, [GOOD, openai("c")])
    refused(path, 2, "but line 1 is a native line")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_job_file(tmp_path / "nope.jsonl")
    path = write_lines(tmp_path, [b"", b"  "])
    with pytest.raises(UserError, match="has no prompts"):
        read_job_file(path)


def test_native_lines_parse_with_settings_and_metadata(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "a", "prompt": "p", "temperature": 0, "top_k": -1,
                                                    "stop": "END", "label": "kept out"}).encode()
                     + b"\n" + json.dumps({"input_ids": [4, 5], "max_new_tokens": 7, "stop_token_ids": [9]}).encode())
    job = read_job_file(path)
    first, second = job.requests
    assert job.format == "native" and job.num_requests == 2
    assert (first.id, first.text, first.line, first.index) == ("a", "p", 1, 0)
    assert first.settings.temperature == 0.0 and first.settings.top_k == 0 and first.settings.stop == ("END",)
    assert first.settings.max_new_tokens is None  # the run's default
    assert (second.id, second.prompt, second.settings.max_new_tokens, second.settings.stop_token_ids) == (2, [4, 5], 7, (9,))
    assert len(job.sha256) == 64


def test_the_input_hash_follows_the_content(tmp_path):
    one = write_lines(tmp_path, [GOOD], "one.jsonl")
    same = write_lines(tmp_path, [GOOD], "same.jsonl")
    other = write_lines(tmp_path, [{"id": "ok", "prompt": "fine!"}], "other.jsonl")
    assert read_job_file(one).sha256 == read_job_file(same).sha256 != read_job_file(other).sha256


def test_openai_lines_parse(tmp_path):
    path = write_lines(tmp_path, [
        openai("t", prompt="hi", max_tokens=5, model="gpt-x", user="u1", n=1, logprobs=None, stop=["\n"]),
        openai("ids", prompt=[[3, 4, 5]], seed=11, top_p=0.9),
        openai("chat", url=CHAT_URL, messages=[{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                            {"type": "text", "text": "b"}]}],
               max_completion_tokens=3),
    ])
    text, ids, chat = read_job_file(path).requests
    assert (text.text, text.settings.max_new_tokens, text.model, text.settings.stop) == ("hi", 5, "gpt-x", ("\n",))
    assert (ids.prompt, ids.settings.seed, ids.settings.top_p) == ([3, 4, 5], 11, 0.9)
    assert chat.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"})
    assert chat.settings.max_new_tokens == 3 and chat.url == CHAT_URL


def test_scanner_streams_every_request_in_order(tmp_path):
    path = write_lines(tmp_path, [{"id": i, "input_ids": [i + 1]} for i in range(5)])
    scanner = JobFileScanner(path)
    assert [r.index for r in scanner] == [0, 1, 2, 3, 4]
    assert scanner.num_requests == 5 and scanner.format == "native"


def fake_completion(request, text):
    return Output(prompt_ids=[0] * 4, output_ids=[7, 8, 9], text=text, finish_reason="length")


def test_openai_batch_round_trip(tmp_path):
    path = write_lines(tmp_path, [openai("r-1", prompt="hi", model="their-model"),
                                  openai("r-2", url=CHAT_URL, messages=[{"role": "user", "content": "hi"}])])
    requests = read_job_file(path).requests
    rows = [output_row(r, fake_completion(r, f"answer {r.id}"), model_name="ours", created=123) for r in requests]
    rows = [json.loads(json.dumps(row)) for row in rows]  # what a reader of the file sees
    completion, chat = rows
    for row, request in zip(rows, requests):
        assert set(row) == {"id", "custom_id", "response", "error"}
        assert row["custom_id"] == request.id and row["error"] is None and row["id"].startswith("batch_req_")
        assert row["response"]["status_code"] == 200 and row["response"]["request_id"].startswith("req_")
        body = row["response"]["body"]
        assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
        assert body["created"] == 123 and row_key(row) == request.key
    assert completion["response"]["body"]["object"] == "text_completion"
    assert completion["response"]["body"]["model"] == "their-model"
    assert completion["response"]["body"]["choices"] == [
        {"index": 0, "text": "answer r-1", "logprobs": None, "finish_reason": "length"}]
    assert chat["response"]["body"]["object"] == "chat.completion" and chat["response"]["body"]["model"] == "ours"
    assert chat["response"]["body"]["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "answer r-2"}, "logprobs": None, "finish_reason": "length"}]
    assert chat["response"]["body"]["id"].startswith("chatcmpl-")
    # Deterministic ids: the same custom_id gives the same ids, another gives others.
    again = output_row(requests[0], fake_completion(requests[0], "x"), model_name="ours", created=5)
    assert again["id"] == completion["id"] and completion["id"] != chat["id"]


def test_native_output_row(tmp_path):
    request = read_job_file(write_lines(tmp_path, [{"id": "a", "input_ids": [1, 2, 3, 4]}])).requests[0]
    row = output_row(request, Output(prompt_ids=[0] * 4, output_ids=[5, 2], text=None, finish_reason="stop"),
                     model_name="m", created=0)
    assert row == {"id": "a", "output_ids": [5, 2], "finish_reason": "stop",
                   "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}}
    with pytest.raises(ValueError, match="finish_reason"):
        Output(prompt_ids=[0] * 1, output_ids=[1], text="", finish_reason="eos")


def byte_tokenize(text):
    return list(text.encode("utf-8"))


def check(path, **overrides):
    kwargs = dict(tokenize=byte_tokenize, vocab_size=256, max_positions=16, default_max_new_tokens=4)
    kwargs.update(overrides)
    return check_tokens(read_job_file(path).requests, **kwargs)


def token_refused(path, line_no, fragment, **overrides):
    with pytest.raises(UserError) as info:
        check(path, **overrides)
    message = str(info.value)
    assert message.startswith(f"{path}:{line_no}: ") and fragment in message, message


def test_token_ids_must_be_in_the_vocabulary(tmp_path):
    path = write_lines(tmp_path, [{"id": 1, "input_ids": [255]}, {"id": 2, "input_ids": [3, 256]}])
    token_refused(path, 2, "token id 256, outside this model's vocabulary [0, 256)")
    path = write_lines(tmp_path, [{"id": 1, "input_ids": [3], "stop_token_ids": [300]}])
    token_refused(path, 1, "stop_token_ids holds token id 300")


def test_prompt_and_new_tokens_must_fit_the_positions(tmp_path):
    path = write_lines(tmp_path, [{"id": 1, "prompt": "x" * 12}, {"id": 2, "prompt": "x" * 13}])
    token_refused(path, 2, "13 tokens + max_new_tokens 4 > the model's 16 positions")
    path = write_lines(tmp_path, [{"id": 1, "prompt": "x" * 12, "max_new_tokens": 5}])
    token_refused(path, 1, "--truncate left")
    path = write_lines(tmp_path, [{"id": 1, "prompt": "x", "max_new_tokens": 16}])
    token_refused(path, 1, "leaves no room", truncate="left")


def test_truncate_left_keeps_the_end_of_the_prompt(tmp_path):
    path = write_lines(tmp_path, [{"id": 1, "input_ids": list(range(1, 21)), "max_new_tokens": 6}, {"id": 2, "prompt": "ab"}])
    long, short = check(path, truncate="left")
    assert (long.prompt_ids.tolist(), long.truncated, long.max_new_tokens) == (list(range(11, 21)), 10, 6)
    assert (short.prompt_ids.tolist(), short.truncated, short.max_new_tokens) == ([97, 98], 0, 4)


def test_chat_needs_a_template_and_uses_it(tmp_path):
    path = write_lines(tmp_path, [openai("c", url=CHAT_URL, messages=[{"role": "user", "content": "hi"}])])
    token_refused(path, 1, "chat template", chat_template=None)
    seen = []

    def template(messages):
        seen.append(messages)
        return [1] + byte_tokenize(messages[0]["content"]) + [2]

    (prepared,) = check(path, chat_template=template)
    assert prepared.prompt_ids.tolist() == [1, 104, 105, 2] and seen == [[{"role": "user", "content": "hi"}]]

    def strict(messages):
        raise ValueError("Conversation roles must alternate user/assistant")

    token_refused(path, 1, "roles must alternate", chat_template=strict)


def test_without_a_tokenizer_only_native_token_ids_work(tmp_path):
    token_refused(write_lines(tmp_path, [{"id": 1, "input_ids": [3]}, {"id": 2, "prompt": "x"}]), 2,
                  "has no tokenizer", tokenize=None)
    token_refused(write_lines(tmp_path, [openai("c", prompt=[1, 2])]), 1, "OpenAI batch output needs text", tokenize=None)
    token_refused(write_lines(tmp_path, [{"id": 1, "input_ids": [3], "stop": "x"}]), 1, "'stop_token_ids'", tokenize=None)
    (prepared,) = check(write_lines(tmp_path, [{"id": 1, "input_ids": [3]}]), tokenize=None)
    assert prepared.prompt_ids.tolist() == [3]


def test_an_empty_text_prompt_has_no_tokens(tmp_path):
    token_refused(write_lines(tmp_path, [{"id": 1, "prompt": ""}]), 1, "no tokens")
