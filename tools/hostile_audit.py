#!/usr/bin/env python
"""Issue 13's audit: the CLI commands used as a hostile and careless user would.

    PYTHONPATH=$PWD python tools/hostile_audit.py [--only SUBSTRING ...] [--table FILE.md] [--keep]

Each case (tools/hostile_cases.py) runs one command (`python -m flexgen_dist.run`, `eval`,
`bench`, `merge`, `profile`) in a subprocess, in its own folder, with HF_HUB_OFFLINE=1,
CUDA_VISIBLE_DEVICES="" and FLEXGEN_CACHE_DIR in the audit's folder (the machine is profiled once
first, so the cases are fast). What "behaved" means (the project's standard):

- a user's mistake: exit code 2 and ONE line on stderr; a failure of the environment (disk full,
  peer died): exit code 1 and one line; SIGINT / SIGTERM: 130 / 143 and one line;
- never a traceback, never a hang (each case has a time limit), never a silent wrong answer
  (cases that should succeed check their output against a reference run);
- no damage: every file the case did not own (the shared fixtures: models, inputs; the files a
  case made before the command ran, unless it names them as the run's) is hashed before and
  after; nothing may appear outside the case's folder: in the parent folder, in HOME, or in
  /tmp, which each command sees as a private bind mount (`unshare --mount`) of an empty folder
  of the case, so another process's files in the real /tmp cannot be mistaken for ours.

Prints a table (case, exit code, message, damage) and exits 0 when every case behaved, else 1.
Run as root for the mount, chown and cgroup cases (they are skipped where they cannot be set up).
Not part of the pytest suite: it takes minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path[:0] = [str(TOOLS), str(REPO / "tests"), str(REPO)]

EXPECTED_CODES = {"user": {2}, "env": {1}, "ok": {0}, "sig": {130, 143}, "pipe": {141}}
ERROR_CODES = {1, 2, 130, 143}
DEFAULT_TIMEOUT_S = 120.0


class Skip(Exception):
    """A case that cannot be set up here (no tmpfs, no cgroup): reported, not counted."""


@dataclass
class Fixtures:
    """Shared, read-only for every case (hashed before and after each one)."""

    root: Path
    llama: Path  # tiny llama with a byte-level tokenizer
    opt: Path  # tiny OPT, no tokenizer
    sharded: Path  # tiny llama in several safetensors shards
    bundled: Path  # the bundled default model
    good: Path  # job file of token-id prompts for the tiny models
    text: Path  # job file of text prompts for the tokenizer model
    reference: dict  # id key -> output_ids of `good` on the tiny llama, everything in memory


@dataclass
class Case:
    name: str
    cls: str
    expect: str  # "user", "env", "ok", "sig", or several joined by "|"
    argv: Callable[["CaseDir"], list[str]]
    setup: Callable[["CaseDir"], None] | None = None
    check: Callable[["CaseDir", "Result"], str | None] | None = None  # extra problem, or None
    env: dict | Callable[["CaseDir"], dict] | None = None  # overrides; a value of None removes the variable
    owns: tuple[str, ...] = ()  # globs (relative to the case folder) of files the run may change or remove
    timeout: float = DEFAULT_TIMEOUT_S
    signal_when: tuple[int, Callable[["CaseDir"], bool]] | None = None  # (signum, event): signal once it holds
    rlimit_as: int | None = None
    cgroup_bytes: int | None = None
    private_tmp: bool = True
    note: str = ""


@dataclass
class Result:
    case: Case
    code: int | None = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    timed_out: bool = False
    skipped: str = ""
    damage: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    @property
    def message(self) -> str:
        lines = self.err_lines or [line for line in self.stdout.splitlines() if line.strip()]
        if not lines:
            return ""
        return lines[0] if self.code in ERROR_CODES else lines[-1]

    @property
    def behaved(self) -> bool:
        return not self.problems


class CaseDir:
    """The folder a case runs in, with helpers for its setup and checks."""

    def __init__(self, root: Path, fx: Fixtures):
        self.d = root
        self.fx = fx
        self.cleanups: list[Callable[[], None]] = []
        self.data: dict = {}  # whatever setup wants the check to see

    def path(self, name: str) -> Path:
        return self.d / name

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            content = content.encode()
        path.write_bytes(content)
        return path

    def copy_model(self, fixture: Path, name: str = "model") -> Path:
        dst = self.d / name
        shutil.copytree(fixture, dst)
        return dst

    def mount_tmpfs(self, name: str, options: str) -> Path:
        mount = self.d / name
        mount.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True, text=True)
        if proc.returncode:
            raise Skip(f"cannot mount a tmpfs ({proc.stderr.strip()[:80]})")
        self.cleanups.append(lambda: subprocess.run(["umount", "-l", str(mount)], capture_output=True))
        return mount

    def remount_ro(self, mount: Path) -> None:
        proc = subprocess.run(["mount", "-o", "remount,ro", str(mount)], capture_output=True, text=True)
        if proc.returncode:
            raise Skip(f"cannot remount read-only ({proc.stderr.strip()[:80]})")

    def read_jsonl(self, name: str) -> list[dict]:
        import json

        return [json.loads(line) for line in (self.d / name).read_text().splitlines() if line.strip()]


# ---- snapshots: what "damage" means -------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> what it is (a file's hash and mode, a link's target, a folder's mode)."""
    found = {}
    if not root.exists():
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            try:
                st = os.lstat(path)
            except OSError:
                continue
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                found[rel] = f"link -> {os.readlink(path)}"
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = f"dir {mode:o} uid {st.st_uid}"
            elif stat.S_ISREG(st.st_mode):
                found[rel] = f"file {mode:o} {_hash(path)}"
            else:
                found[rel] = f"special {stat.S_IFMT(st.st_mode):o}"
    return found


def _hash(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    return h.hexdigest()[:16]


def _owned(rel: str, owns: tuple[str, ...]) -> bool:
    from fnmatch import fnmatch

    return any(fnmatch(rel, pattern) or rel.startswith(pattern.rstrip("*").rstrip("/") + "/") and pattern.endswith("/*")
               for pattern in owns)


def compare(before: dict[str, str], after: dict[str, str], where: str, owns: tuple[str, ...] = (),
            allow_new: bool = True) -> list[str]:
    damage = []
    for rel, what in before.items():
        if _owned(rel, owns):
            continue
        if rel not in after:
            damage.append(f"{where}/{rel} removed")
        elif after[rel] != what:
            damage.append(f"{where}/{rel} changed")
    if not allow_new:
        damage += [f"{where}/{rel} created" for rel in after if rel not in before]
    return damage


def top_entries(folder: Path) -> set[str]:
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


# ---- running one case ---------------------------------------------------------------------------


class Audit:
    def __init__(self, base: Path, fx: Fixtures, env: dict):
        self.base = base
        self.fx = fx
        self.env = env
        self.cases_root = base / "cases"
        self.cases_root.mkdir(exist_ok=True)
        self.home = Path(env["HOME"])
        self.has_unshare = _unshare_works(base)

    def command(self, argv: list[str], private_tmp: Path | None) -> list[str]:
        if private_tmp is None or not self.has_unshare:
            return argv
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" /tmp && exec "$@"', str(private_tmp), *argv]

    def run(self, case: Case) -> Result:
        result = Result(case)
        folder = self.cases_root / case.name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        c = CaseDir(folder, self.fx)
        c.data["env"] = self.env  # for setups that run a command first
        try:
            try:
                if case.setup is not None:
                    case.setup(c)
            except Skip as exc:
                result.skipped = str(exc)
                return result
            self._execute(case, c, result)
            if case.check is not None and not result.timed_out:
                try:
                    problem = case.check(c, result)
                except Exception as exc:  # a check that cannot read what it expects: that is the finding
                    problem = f"check failed: {type(exc).__name__}: {exc}"
                if problem:
                    result.problems.append(problem)
        finally:
            for cleanup in reversed(c.cleanups):
                cleanup()
        self._judge(result)
        return result

    def _execute(self, case: Case, c: CaseDir, result: Result) -> None:
        private_tmp = c.d / ".slash_tmp" if case.private_tmp else None
        if private_tmp is not None:
            private_tmp.mkdir()
        env = dict(self.env)
        overrides = case.env(c) if callable(case.env) else (case.env or {})
        for key, value in overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        fixtures_before = {str(root): snapshot(root) for root in (self.fx.root, self.fx.bundled)}
        case_before = {k: v for k, v in snapshot(c.d).items() if not k.startswith(".slash_tmp")}
        parent_before = top_entries(self.cases_root)
        home_before = snapshot(self.home)
        real_tmp_before = top_entries(Path("/tmp")) if not self.has_unshare else set()
        argv = self.command([str(a) for a in case.argv(c)], private_tmp)
        cgroup = None
        if case.cgroup_bytes is not None:
            cgroup = _make_cgroup(case.cgroup_bytes)
            if cgroup is None:
                result.skipped = "no memory cgroup can be made here"
                return
            c.cleanups.append(cgroup.cleanup)

        def preexec() -> None:
            os.setsid()  # its own process group: a signal to it reaches the command only
            if case.rlimit_as is not None:
                import resource

                resource.setrlimit(resource.RLIMIT_AS, (case.rlimit_as, case.rlimit_as))
            if cgroup is not None:
                with open(cgroup.procs_file, "w") as f:
                    f.write(str(os.getpid()))

        start = time.monotonic()
        out_path, err_path = c.d / ".stdout", c.d / ".stderr"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(argv, cwd=c.d, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                    preexec_fn=preexec)
            try:
                if case.signal_when is not None:
                    signum, event = case.signal_when
                    deadline = start + case.timeout
                    while proc.poll() is None and time.monotonic() < deadline:
                        if event(c):
                            proc.send_signal(signum)
                            break
                        time.sleep(0.05)
                    else:
                        if proc.poll() is None:
                            result.problems.append("the event to signal on never happened")
                result.code = proc.wait(timeout=max(1.0, case.timeout - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                result.timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                result.code = None
        result.seconds = time.monotonic() - start
        result.stdout = out_path.read_text(errors="replace")
        result.stderr = err_path.read_text(errors="replace")
        out_path.unlink()
        err_path.unlink()
        # damage: what the case did not own, and what appeared outside its folder
        for root, before in fixtures_before.items():
            result.damage += compare(before, snapshot(Path(root)), root)
        case_after = {k: v for k, v in snapshot(c.d).items() if not k.startswith(".slash_tmp")}
        result.damage += compare(case_before, case_after, "case", case.owns)
        result.damage += [f"{self.cases_root}/{name} created" for name in top_entries(self.cases_root) - parent_before]
        result.damage += compare(home_before, snapshot(self.home), "HOME", allow_new=False)
        if private_tmp is not None and self.has_unshare:
            result.damage += [f"/tmp/{name} left behind" for name in sorted(top_entries(private_tmp))]
        else:
            result.damage += [f"/tmp/{name} created (maybe another process's)"
                              for name in sorted(top_entries(Path("/tmp")) - real_tmp_before)]

    def _judge(self, result: Result) -> None:
        if result.skipped:
            return
        case = result.case
        allowed = set().union(*(EXPECTED_CODES[kind] for kind in case.expect.split("|")))
        if result.timed_out:
            result.problems.insert(0, f"hung: killed after {case.timeout:.0f} s")
        elif result.code not in allowed:
            result.problems.insert(0, f"exit {result.code}, expected {case.expect}")
        if "Traceback" in result.stderr or "Traceback" in result.stdout:
            result.problems.append("traceback")
        if result.code in ERROR_CODES and len(result.err_lines) != 1:
            result.problems.append(f"{len(result.err_lines)} lines on stderr, not 1")
        result.problems += [f"damage: {d}" for d in result.damage]


def _unshare_works(base: Path) -> bool:
    probe = base / ".probe"
    probe.mkdir(exist_ok=True)
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           'mount --bind "$0" /tmp && touch /tmp/x', str(probe)], capture_output=True)
    ok = proc.returncode == 0 and (probe / "x").exists()
    shutil.rmtree(probe, ignore_errors=True)
    return ok


def _make_cgroup(limit: int):
    try:
        from flexgen_dist.bench.cgroups import make_cgroup_v1, make_cgroup_v2
    except ImportError:
        return None
    return make_cgroup_v2(limit) or make_cgroup_v1(limit)


# ---- fixtures -----------------------------------------------------------------------------------


def base_env(base: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_", "FLEXGEN_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                         "TMPDIR", "HOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               FLEXGEN_CACHE_DIR=str(base / "cache"), HOME=str(base / "home"), PYTHONPATH=str(REPO),
               PYTHONDONTWRITEBYTECODE="1")
    return env


def build_fixtures(base: Path, env: dict) -> Fixtures:
    import json

    import tiny_models
    from flexgen_dist import DEFAULT_MODEL

    root = base / "fixtures"
    root.mkdir()
    llama = tiny_models.make_tiny_model("llama", root / "llama", tokenizer=True)
    opt = tiny_models.make_tiny_model("opt", root / "opt")
    sharded = tiny_models.make_tiny_model("llama", root / "sharded", make_sharded=True)
    prompts = tiny_models.random_prompts([3, 5, 8, 4, 6, 7], seed=13)
    good = root / "good.jsonl"
    good.write_text("".join(json.dumps({"id": f"p{i}", "input_ids": ids}) + "\n" for i, ids in enumerate(prompts)))
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n"
                            for i, p in enumerate(["hello there", "The cat", "x = 1", "def f("])))
    # the reference: the same job with everything in memory
    ref_dir = base / "reference"
    ref_dir.mkdir()
    proc = subprocess.run([sys.executable, "-m", "flexgen_dist.run", "--model", str(llama), "--input", str(good),
                           "--output", str(ref_dir / "out.jsonl"), "--max-new-tokens", "4", "--no-warmup", "--quiet",
                           "--policy", "manual", "--gpu-batch-size", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode:
        sys.exit(f"the reference run failed:\n{proc.stderr}")
    reference = {json.dumps(row["id"]): row["output_ids"]
                 for row in map(json.loads, (ref_dir / "out.jsonl").read_text().splitlines())}
    return Fixtures(root=root, llama=llama, opt=opt, sharded=sharded, bundled=Path(DEFAULT_MODEL), good=good,
                    text=text, reference=reference)


def profile_once(audit: Audit) -> None:
    """Cache this machine's profile for the folders the cases use (/tmp inside a case's private
    mount, the audit's own file system), so no case spends seconds measuring."""
    for offload in ("/tmp", str(audit.base)):
        private = audit.base / ".profile_tmp"
        private.mkdir(exist_ok=True)
        argv = audit.command([sys.executable, "-m", "flexgen_dist.profile", "--quick", "--offload-dir", offload], private)
        proc = subprocess.run(argv, env=audit.env, capture_output=True, text=True, timeout=300)
        if proc.returncode:
            sys.exit(f"profiling failed:\n{proc.stderr}")
        shutil.rmtree(private, ignore_errors=True)


# ---- the report ---------------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    rows = ["| # | case | class | expected | exit | lines | traceback | message (first 100 chars) | damage | verdict |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, r in enumerate(results, start=1):
        if r.skipped:
            rows.append(f"| {i} | {r.case.name} | {r.case.cls} | {r.case.expect} | - | - | - | {cell(r.skipped[:100])} | - | skipped |")
            continue
        code = "timeout" if r.timed_out else str(r.code)
        tb = "yes" if "Traceback" in r.stderr + r.stdout else "no"
        damage = cell("; ".join(r.damage)[:120]) or "none"
        verdict = "ok" if r.behaved else "**BAD**: " + cell("; ".join(p for p in r.problems if not p.startswith("damage"))[:160])
        rows.append(f"| {i} | {r.case.name} | {r.case.cls} | {r.case.expect} | {code} | {len(r.err_lines)} | {tb} | "
                    f"{cell(r.message[:100])} | {damage} | {verdict} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="run the cases whose name contains this (repeatable)")
    parser.add_argument("--table", default=None, help="also write the table (markdown) to this file")
    parser.add_argument("--keep", action="store_true", help="keep the audit's folder (default: removed)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)

    sys.modules.setdefault("hostile_audit", sys.modules[__name__])  # one Case / Skip class for both files
    import hostile_cases

    cases = hostile_cases.all_cases()
    names = [c.name for c in cases]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        sys.exit(f"duplicate case names: {sorted(duplicates)}")
    if args.list:
        print("\n".join(f"{c.cls:8} {c.name}" for c in cases))
        print(f"{len(cases)} cases")
        return 0
    if args.only:
        cases = [c for c in cases if any(s in c.name for s in args.only)]
    base = Path(tempfile.mkdtemp(prefix="hostile-audit-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None))
    for name in ("cache", "home"):
        (base / name).mkdir()
    env = base_env(base)
    print(f"audit folder: {base}", file=sys.stderr)
    try:
        fx = build_fixtures(base, env)
        audit = Audit(base, fx, env)
        if not audit.has_unshare:
            print("warning: unshare --mount does not work here: /tmp is watched as it is (noisy)", file=sys.stderr)
        profile_once(audit)
        results = []
        for i, case in enumerate(cases, start=1):
            result = audit.run(case)
            results.append(result)
            state = "skipped" if result.skipped else ("ok" if result.behaved else "BAD")
            print(f"[{i}/{len(cases)}] {case.name}: {state} ({result.seconds:.1f} s) {result.code} "
                  f"{result.message[:90]!r} {'; '.join(result.problems)[:200]}", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            subprocess.run(["umount", "-R", "-l", str(base)], capture_output=True)
            shutil.rmtree(base, ignore_errors=True)
    text = table(results)
    ran = [r for r in results if not r.skipped]
    bad = [r for r in ran if not r.behaved]
    summary = (f"{len(results)} cases: {len(ran)} ran, {len(results) - len(ran)} skipped; "
               f"{len(ran) - len(bad)} behaved, {len(bad)} misbehaved")
    print(text)
    print(summary)
    if args.table:
        Path(args.table).write_text(f"# Hostile-user audit (issue 13)\n\n{summary}\n\n{text}\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
