"""Run one command and print its wall time and peak RSS as JSON: ``timed.py LOG -- CMD...``.

Why a separate launcher: on Linux a child's ``ru_maxrss`` starts at the resident size of the
process it was forked from (exec records the old address space's high-water mark), so a command
forked straight from the benchmark, which has torch loaded, would never report less than the
benchmark's own few hundred MB. This launcher imports nothing heavy, so its children's figures
are their own. The command's stdout and stderr go to LOG.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: timed.py LOG -- COMMAND...", file=sys.stderr)
        return 2
    log, command = argv[0], argv[2:]
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.execvp(command[0], command)
        finally:
            os._exit(127)  # only reached when exec failed
    _, status, usage = os.wait4(pid, 0)
    wall_s = time.perf_counter() - started
    result = {
        "wall_s": wall_s,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # KiB on Linux
        "cpu_s": usage.ru_utime + usage.ru_stime,  # every thread's, user and system
        "returncode": os.waitstatus_to_exitcode(status),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
