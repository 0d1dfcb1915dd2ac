"""The machine a benchmark ran on, named once for every script in benchmarks/.

Result files are named after the CPU (benchmarks/results/<cpu>-<cores>c...), so the scripts
must agree on what that name is.
"""

from __future__ import annotations

import platform


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo; elsewhere (no /proc, or an architecture whose
    cpuinfo has no "model name") platform.processor(), or "cpu" when even that is empty."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"
