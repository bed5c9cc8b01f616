"""Run a console script (``preftune run config.toml``) in this process and report its peak RSS.

``python bench/run_cli.py preftune run config.toml`` executes the installed ``preftune`` script
exactly as the shell would (``runpy`` with ``__name__ == "__main__"``); the only addition is the
exit hook of :mod:`benchutil` that writes the process's own peak RSS to ``$BENCH_REPORT``.
"""

from __future__ import annotations

import runpy
import shutil
import sys

from benchutil import install_report

if __name__ == "__main__":
    script = shutil.which(sys.argv[1]) if len(sys.argv) > 1 else None
    if script is None:
        sys.exit("usage: python bench/run_cli.py SCRIPT [ARGS...] (SCRIPT must be on PATH)")
    install_report()
    sys.argv = [script, *sys.argv[2:]]
    runpy.run_path(script, run_name="__main__")
