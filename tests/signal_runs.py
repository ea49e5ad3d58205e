"""Shared by the signal tests: a fake ``scontrol`` on PATH and a ``python -m blip2_train`` started in the
background whose output is read until the checkpoint callback says it handles SLURM's pre-timeout signal."""

from __future__ import annotations

import os
import subprocess
import sys
import threading


def fake_scontrol(tmp_path):
    """A ``scontrol`` that records its arguments: (the folder to put first on PATH, the record file)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    return bin_dir, calls


def start_slurm_run(tmp_path, overrides: list[str]):
    """``python -m blip2_train *overrides`` as SLURM job 4242 with the fake scontrol: (process, its output
    lines so far, an event set once the pre-timeout signal handler is installed), and the scontrol record."""
    bin_dir, calls = fake_scontrol(tmp_path)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", PYTHONUNBUFFERED="1")
    env.pop("BLIP2_RUN_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "blip2_train", *overrides], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, armed = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "SLURM's pre-timeout signal" in line:
                armed.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return proc, lines, armed, reader, calls
