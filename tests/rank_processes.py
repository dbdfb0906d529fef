"""Ranks started as subprocesses, for tests that must act at a known point of a rank's life.

A thread reads each rank's stderr line by line as it is written, so a test waits for the line
that marks the event (the rendezvous completed, the connect loop started) instead of sleeping
and hoping the rank got there.
"""

from __future__ import annotations

import subprocess
import threading


class RankProcess:
    def __init__(self, args: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._lines: list[str] = []
        self._ended = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    @property
    def stderr(self) -> str:
        with self._changed:
            return "".join(self._lines)

    def wait_for_line(self, text: str, timeout_s: float) -> None:
        """Return once a stderr line contains `text`; fail if the rank ends or `timeout_s` passes first."""
        with self._changed:
            seen = self._changed.wait_for(lambda: self._ended or any(text in line for line in self._lines), timeout_s)
            found = any(text in line for line in self._lines)
        assert found, f"no line with {text!r} ({'the rank ended' if seen else f'{timeout_s:g} s passed'}):\n" + (
            self.stderr[-3000:]
        )

    def finish(self, timeout_s: float) -> tuple[int, str]:
        """Wait for the rank to exit (at most `timeout_s`, else TimeoutExpired); its code and stderr."""
        code = self.proc.wait(timeout=timeout_s)
        self._reader.join(timeout=timeout_s)
        return code, self.stderr

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
