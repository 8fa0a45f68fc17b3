"""Many `ndsnn` CLI calls in one child process: `main()` in a loop (a torch import per call costs seconds),
with each result written as soon as it is known, so a child killed by a signal or hung still names the
call it died on. A call's stderr is what Python wrote to sys.stderr plus what native code (libpng, HDF5)
wrote to file descriptor 2 meanwhile. Used by the bad-input corpus (test_reliability), the file fuzzer
and crafted corpus (test_validate) and the hostile-input families (test_hostile)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

RUNNER = r"""
import contextlib, hashlib, io, json, os, resource, sys, tempfile, time, traceback
from pathlib import Path
from ndsnn_cli.cli import main

def peak_mb():
    # this process's resident high-water mark since exec (VmHWM); ru_maxrss would include the parent's, inherited
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

@contextlib.contextmanager
def native_stderr(sink):
    # file descriptor 2 into `sink` meanwhile: what C libraries (libpng, HDF5) print is the command's stderr too
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)

def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}

jobs = json.loads(Path(sys.argv[1]).read_text())
with open(sys.argv[2], "w") as log:
    for job in jobs:
        log.write(json.dumps({"start": job["id"]}) + "\n"); log.flush()
        before = digest(job["watch"]) if job.get("watch") else None
        err, out = io.StringIO(), io.StringIO()
        sys.argv = ["ndsnn", *job["argv"]]
        code, started = 0, time.perf_counter()
        with tempfile.TemporaryFile() as native:
            with native_stderr(native), contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                try:
                    main()
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException:
                    traceback.print_exc()
                    code = -1
            native.seek(0)
            printed = native.read().decode("utf-8", "replace")
        result = {"id": job["id"], "code": code, "stderr": printed + err.getvalue(), "stdout": out.getvalue(),
                  "seconds": time.perf_counter() - started,
                  "peak_rss_mb": peak_mb()}  # the child's peak so far
        if before is not None:
            result["unchanged"] = before == digest(job["watch"])
        log.write(json.dumps(result) + "\n"); log.flush()
"""


def cli_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


class ChildDied(AssertionError):
    """The CLI child process crashed (a signal, an interpreter error) or hung; names the call."""


def run_cli_jobs(jobs: list[dict[str, Any]], work: Path, timeout: float) -> tuple[dict[str, dict[str, Any]], float]:
    """Run jobs `{"id", "argv", ["watch": a folder to digest before and after]}` in one child process.

    Returns (id -> {code, stderr, stdout, seconds, peak_rss_mb[, unchanged]}, the child's CPU seconds); raises
    ChildDied naming the last call started. `timeout` is wall time: shared machines run tests starved.
    """
    (work / "jobs.json").write_text(json.dumps(jobs))
    log = work / "results.jsonl"
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        proc = subprocess.run([sys.executable, "-c", RUNNER, str(work / "jobs.json"), str(log)], env=cli_env(),
                              capture_output=True, text=True, timeout=timeout)
        died = proc.returncode != 0 and f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    except subprocess.TimeoutExpired:
        died = f"hang: no result within {timeout} s"
    lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    if died:
        last = next((line["start"] for line in reversed(lines) if "start" in line), None)
        raise ChildDied(f"CLI child process died on job {last!r} ({died})")
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    return {line["id"]: line for line in lines if "id" in line}, cpu
