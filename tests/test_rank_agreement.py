"""The ranks of a pipeline agree before they compute: a rank started with another checkpoint of
the same shape, other generation settings or another input is refused by every rank together,
in one line from rank 0 naming the rank and what differs (before, two checkpoints of one shape
finished with exit 0 and wrong output); a rank that cannot start at all has its own error shown
by rank 0, whichever rank it is."""

import json
import os
import socket
import sys
from pathlib import Path

import pytest

from rank_processes import RankProcess
from tiny_models import make_tiny_model

pytestmark = pytest.mark.dist

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
       "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("agree")
    return {seed: make_tiny_model("llama", root / f"seed{seed}", seed=seed, num_hidden_layers=2) for seed in (0, 1)}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(argvs: list[list[str]]) -> list[tuple[int, str]]:
    port = _free_port()
    ranks = []
    for rank, argv in enumerate(argvs):
        env = {**ENV, "RANK": str(rank), "WORLD_SIZE": str(len(argvs)), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(len(argvs)), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        ranks.append(RankProcess([sys.executable, "-m", "flexgen_dist.run", *argv], env))
    try:
        return [rank.finish(timeout_s=600) for rank in ranks]  # a bound for a hung test, not a measurement
    finally:
        for rank in ranks:
            rank.kill()


def _argv(model, out, *more):
    return ["--model", str(model), "--prompt-len", "4", "--num-prompts", "4", "--gpu-batch-size", "2", "--gen-len", "3",
            "--no-warmup", "--comm-timeout", "300", "--output", str(out), *more]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("differs,where", [
    ("model", "the ranks disagree on weights: rank 1 has "),
    ("gen-len", "the ranks disagree on generation settings: rank 1 has "),
    ("block", "the ranks disagree on --gpu-batch-size: rank 1 has 4, rank 0 2;"),
])
def test_ranks_that_differ_refuse_together_naming_the_rank_and_what(models, tmp_path, differs, where):
    out = tmp_path / "out.jsonl"
    second = {"model": _argv(models[1], out), "gen-len": _argv(models[0], out, "--gen-len", "5"),
              "block": _argv(models[0], out, "--gpu-batch-size", "4")}[differs]
    (code0, err0), (code1, err1) = _run_ranks([_argv(models[0], out), second])
    assert (code0, code1) == (2, 2), err0[-3000:] + err1[-3000:]
    assert "Traceback" not in err0 + err1
    lines = _error_lines(err0)
    assert len(lines) == 1 and where in lines[0], err0[-3000:]
    assert "start every rank with the same command" in lines[0]
    assert _error_lines(err1) == []  # shown once, by rank 0
    assert not out.exists()


@pytest.mark.parametrize("fault", ["missing model", "bad flag", "own folder"])
def test_a_rank_that_cannot_start_has_its_error_shown_by_rank_0(models, tmp_path, fault):
    """A flag that only one rank got wrong (--io-threads, --offload-dir: not compared, they may
    differ per node) stops every rank with that rank's line. Before, --io-threads was checked
    after the agreement and the offload folder while planning: rank 1 stopped without a word (its
    errors went unprinted on ranks but 0) and rank 0 said only that rank 1 died or hung."""
    out = tmp_path / "out.jsonl"
    missing = tmp_path / "no-such-model"
    (tmp_path / "a-file").write_text("")
    on_disk = ("--percent", "50", "50", "100", "0", "100", "0", "--offload-dir")
    first = _argv(models[0], out, *on_disk, str(tmp_path / "offload")) if fault == "own folder" else _argv(models[0], out)
    second, said = {"missing model": (_argv(missing, out), "no-such-model"),
                    "bad flag": (_argv(models[0], out, "--io-threads", "0"), "--io-threads must be between"),
                    "own folder": (_argv(models[0], out, *on_disk, str(tmp_path / "a-file" / "offload")),
                                   "a-file/offload cannot be created")}[fault]
    (code0, err0), (code1, err1) = _run_ranks([first, second])
    assert (code0, code1) == (2, 2), err0[-3000:] + err1[-3000:]
    lines = _error_lines(err0)
    assert len(lines) == 1 and lines[0].startswith("error: rank 1: ") and said in lines[0], err0[-3000:]
    assert _error_lines(err1) == []  # shown once, by rank 0
    assert "Traceback" not in err0 + err1


def test_a_rank_prints_its_own_mistake_and_rank_0_alone_a_shared_one(capsys):
    """A mistake raised on rank 1 alone (after the ranks parted ways) is printed by rank 1, naming
    itself: rank 0 can only see that it left. One raised alike on every rank is printed once."""
    from flexgen_dist.cli.shell import run_command
    from flexgen_dist.errors import SharedError, UserError

    def fails(exc):
        def body():
            raise exc
        return body

    for rank, exc, shown in [(1, UserError("its folder is gone"), "error: rank 1: its folder is gone\n"),
                             (1, SharedError("rank 1: told to all"), ""),
                             (0, SharedError("rank 1: told to all"), "error: rank 1: told to all\n"),
                             (0, UserError("rank 0's own"), "error: rank 0's own\n")]:
        assert run_command(fails(exc), rank_of=lambda: rank) == 2
        assert capsys.readouterr().err == shown


def test_ranks_that_agree_run(models, tmp_path):
    """The same command on each rank (the model folder given by another path to the same files)."""
    out = tmp_path / "out.jsonl"
    alias = tmp_path / "alias"
    alias.symlink_to(models[0], target_is_directory=True)
    (code0, err0), (code1, err1) = _run_ranks([_argv(models[0], out), _argv(alias, out)])
    assert (code0, code1) == (0, 0), err0[-3000:] + err1[-3000:]
    assert len([json.loads(line) for line in out.read_text().splitlines()]) == 4
