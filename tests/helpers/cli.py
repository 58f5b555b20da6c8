"""The `tinymlaas` command as a user runs it."""

import subprocess
import sys


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """`tinymlaas ARGS` as a user runs it: a new process, its exit status and its output."""
    return subprocess.run([sys.executable, "-m", "tinymlaas", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, check=False)
