"""Progress files are input too: a `.partial` line that answers no id of the input, a line edited
into something else, a `.run.json` whose fields are JSON of the wrong type. Each is refused when
the run opens its output (file:line, how to go on), before anything is computed, and the saved
results stay as they were."""

import json
import logging

import pytest

from flexgen_dist.errors import UserError
from flexgen_dist.jobs.outputs import RunIdentity, progress_paths
from flexgen_dist.jobs.resume import open_for_resume
from flexgen_dist.run import main

IDENTITY = RunIdentity(model="model-a", input_sha256="0" * 64, settings={"max_new_tokens": 4})
FAST = ["--no-warmup", "--quiet", "--gpu-batch-size", "2", "--device", "cpu", "--max-new-tokens", "3"]


def row(request_id):
    return {"id": request_id, "output_ids": [7, 8]}


def key(request_id):
    return json.dumps(request_id)


def saved(tmp_path, *ids):
    out = tmp_path / "out.jsonl"
    with open_for_resume(out, IDENTITY) as log:
        log.append([row(i) for i in ids])
    return out


def test_a_saved_id_the_input_lacks_is_refused_with_its_line(tmp_path):
    out = saved(tmp_path, "a", "zz", "b")
    partial, _ = progress_paths(out)
    before = partial.read_bytes()
    with open_for_resume(out, IDENTITY) as log:
        with pytest.raises(UserError, match=r"out\.jsonl\.partial:2: id \"zz\" is not in 'in\.jsonl' \(1 such"):
            log.check_ids([key("a"), key("b"), key("c")], "in.jsonl")
        log.check_ids([key("a"), key("zz"), key("b")], "in.jsonl")  # all there: nothing to say
    assert partial.read_bytes() == before


def test_an_edited_line_among_results_is_refused_not_dropped_with_what_follows(tmp_path):
    out = saved(tmp_path, "a")
    partial, _ = progress_paths(out)
    with open(partial, "ab") as f:
        f.write(b'{"id": "b", "output_ids": [1,\n' + json.dumps(row("c")).encode() + b"\n")
    before = partial.read_bytes()
    with pytest.raises(UserError, match=r"out\.jsonl\.partial:2: not a result line.*delete or fix that line"):
        open_for_resume(out, IDENTITY)
    assert partial.read_bytes() == before


@pytest.mark.parametrize("edited", [{"id": "b", "output_ids": "7 8"}, {"id": "b", "output_ids": [7, None]},
                                    {"id": "b"}, {"custom_id": "b", "response": "ok"}, ["b", 7]])
def test_a_line_edited_into_another_shape_is_refused_and_dropped_only_when_last(tmp_path, edited):
    out = saved(tmp_path, "a")
    partial, _ = progress_paths(out)
    with open(partial, "ab") as f:
        f.write(json.dumps(edited).encode() + b"\n" + json.dumps(row("c")).encode() + b"\n")
    before = partial.read_bytes()
    with pytest.raises(UserError, match=r"out\.jsonl\.partial:2: not a result line"):
        open_for_resume(out, IDENTITY)
    assert partial.read_bytes() == before
    partial.write_bytes(before[: before.rindex(b"{", 0, len(before) - 1)])  # the edited line is the last one
    with open_for_resume(out, IDENTITY) as log:  # as a crash's last line: dropped, computed again
        assert set(log.finished) == {key("a")}


@pytest.mark.parametrize("field, value, kind", [
    ("settings", [], "a list, not an object"),
    ("settings", "max_new_tokens=4", "a string, not an object"),
    ("model", 5, "a whole number, not a string"),
    ("shard", None, "missing (or null), not a string"),
    ("started_at", "yesterday", "a string, not a whole number"),
    ("started_at", True, "true/false, not a whole number"),
])
def test_a_run_record_field_of_the_wrong_type_is_one_line_with_its_line(tmp_path, field, value, kind):
    out = saved(tmp_path, "a")
    partial, record_path = progress_paths(out)
    record = json.loads(record_path.read_text())
    record[field] = value
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    line = next(i for i, text in enumerate(record_path.read_text().splitlines(), 1) if f'"{field}"' in text)
    before = partial.read_bytes()
    with pytest.raises(UserError) as caught:
        open_for_resume(out, IDENTITY)
    message = str(caught.value)
    assert message.startswith(f"{record_path}:{line}: the run record's '{field}' is {kind}")
    assert "--overwrite" in message and "out.jsonl.partial aside" in message and "\n" not in message
    assert partial.read_bytes() == before


def _drop_handlers():
    for handler in list(logging.getLogger().handlers):
        if getattr(handler, "_flexgen_dist", False):
            logging.getLogger().removeHandler(handler)


def test_a_job_refuses_a_foreign_saved_id_before_it_computes_and_resumes_once_it_is_gone(
        llama_dir, tmp_path, capsys, monkeypatch):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "input_ids": [5, 6 + i, 7]}) + "\n" for i in range(4)))
    out = tmp_path / "out.jsonl"
    args = ["--model", str(llama_dir), "--input", str(src), "--output", str(out), *FAST]
    assert main(args) == 0
    reference = out.read_text()
    capsys.readouterr()
    _drop_handlers()
    # the progress files of an unfinished run of this job: two results saved, then one edited in
    from flexgen_dist.jobs import resume, run as job
    monkeypatch.setattr(resume.ResumeLog, "finish", lambda self, order: self.close())
    out.unlink()
    assert main(args) == 0
    monkeypatch.undo()
    capsys.readouterr()
    _drop_handlers()
    partial, _ = progress_paths(out)
    kept = partial.read_text().splitlines(keepends=True)[:2]
    partial.write_text(kept[0] + json.dumps({"id": 99, "output_ids": [1]}) + "\n" + kept[1])
    before = partial.read_bytes()

    monkeypatch.setattr(job, "LLM", lambda *a, **k: pytest.fail("the model loaded before the check"))
    code = main(args)
    err = capsys.readouterr().err
    _drop_handlers()
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{partial}:2: id 99 is not in '{src}'" in lines[0], err
    assert partial.read_bytes() == before and not out.exists()
    monkeypatch.undo()

    partial.write_text("".join(kept))  # the user deletes the line, as the message says
    assert main(args) == 0
    _drop_handlers()
    assert out.read_text() == reference
