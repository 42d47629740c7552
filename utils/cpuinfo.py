"""The CPU's feature flags, as Linux reports them: which int8 kernels a runtime can use exactly and fast."""
from __future__ import annotations

import functools

VNNI_FLAGS = ("avx512_vnni", "avx_vnni")  # x86 CPU flags of VPDPBUSD: u8 x s8 products summed in 32 bits


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """The CPU's feature flags as Linux reports them in /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()
