"""An interrupt that lands while code made by ``exec`` runs (dataclasses, numba and others make
functions that way, often while della imports a module mid-merge) leaves CPython believing the
KeyboardInterrupt went unhandled; under ``python -m`` it then killed della by SIGINT (exit -2)
right after della had reported exit 130. Seen at random in the real-signal fuzz tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import sys
from della_cli.io import interrupts

interrupts.install()
from della_cli import cli


@cli.app.command("probe")
def probe() -> None:
    with cli.reported_errors():
        exec("import os, signal, time\\nos.kill(os.getpid(), signal.SIGINT)\\ntime.sleep(1)")


@cli.app.command("other")
def other() -> None:
    pass


sys.argv = ["della", "probe"]
cli.main()
"""


def test_an_interrupt_inside_exec_code_still_exits_130(tmp_path):
    package = tmp_path / "probe"
    package.mkdir()
    (package / "__main__.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-m", "probe"], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 130, (done.returncode, done.stderr)
    assert done.stderr == "error: interrupted; nothing was written\n"
