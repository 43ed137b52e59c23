"""Helpers shared by the benchmark scripts: machine facts, other processes' CPU load, the
command line, and writing one script's own section of RESULTS.md."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

__all__ = ["ForeignLoad", "command_line", "cpu_ticks", "machine_info", "write_section"]


def machine_info(threads: bool = True) -> dict[str, str]:
    """CPU model and vector flags, logical cores, torch (and its thread count), python."""
    cpu, flags = "unknown", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == "unknown":
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    have = set(line.split(":", 1)[1].split())
                    flags = ", ".join(x for x in ("avx2", "fma", "avx512f") if x in have)
    except OSError:
        pass
    info = {"CPU": f"{cpu} ({flags})", "logical cores": str(os.cpu_count()),
            "torch": torch.__version__}
    if threads:
        info["torch threads"] = str(torch.get_num_threads())
    info["python"] = platform.python_version()
    return info


def cpu_ticks() -> tuple[int, int]:
    """(total, busy) clock ticks of all CPUs since boot (/proc/stat; steal counts as busy)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    return sum(fields), sum(fields) - fields[3] - fields[4]


class ForeignLoad:
    """Fraction of all CPUs used by *other* processes between ``start()`` and ``stop()``."""

    def start(self) -> None:
        self.ticks = cpu_ticks()
        self.own = sum(os.times()[:2])

    def stop(self) -> float:
        total, busy = cpu_ticks()
        own = sum(os.times()[:2])
        hz = os.sysconf("SC_CLK_TCK")
        d_total = max(1, total - self.ticks[0])
        d_busy = busy - self.ticks[1]
        return max(0.0, (d_busy - (own - self.own) * hz) / d_total)


def command_line(script: str) -> str:
    """The command that ran ``benchmarks/script`` with this process's arguments."""
    return " ".join([".venv-bench/bin/python", f"benchmarks/{script}", *sys.argv[1:]])


def write_section(path: Path, heading: str, body: str) -> None:
    """Replace this script's own ``## heading`` section of ``path`` (up to the next ``## ``
    line), or append it; other sections stay byte for byte. A new file gets a
    ``# Benchmarks`` title."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    section = f"{heading}\n\n{body.rstrip()}\n\n"
    if start is None:
        if not text.endswith("\n\n"):
            text = text.rstrip("\n") + "\n\n"
        path.write_text(text + section)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
               len(lines))
    path.write_text("".join(lines[:start]) + section + "".join(lines[end:]))
