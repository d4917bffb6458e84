"""Host memory: the ``maskjax`` command runs with glibc's malloc backing large blocks by huge pages.

XLA:CPU allocates each execution's temporary buffer (activations kept for the backward pass,
gradients: 3.4 GB for a ViT-B/16 MAE step at batch 16) with ``malloc``; glibc maps blocks that large
afresh on every call and unmaps them on ``free``, so every train step faults in and zeroes ~900,000
4 KiB pages. With ``glibc.malloc.hugetlb=1`` glibc asks the kernel for transparent huge pages on
those mappings (2 MiB each), which made that step ~15% faster on the 2-core development machine
(5.7 -> 4.9 s; ``docs/performance.md``). On accelerators the step's buffers live in device memory,
and the setting only touches host-side allocations.

glibc reads its tunables once, at process start, so :func:`reexec_with_huge_pages` starts the same
command again (same process id, same arguments) with the tunable added to ``GLIBC_TUNABLES``. It does
nothing where the tunable is already named (any value: ``GLIBC_TUNABLES=glibc.malloc.hugetlb=0``
turns this off), off Linux/glibc, or where the kernel has transparent huge pages disabled.
"""
from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def tunables_with_huge_pages(current: str | None) -> str | None:
    """The ``GLIBC_TUNABLES`` value with ``glibc.malloc.hugetlb=1`` added to ``current``; None where
    ``current`` already names the tunable (the user's choice stands, and a started-again process
    does not start again)."""
    current = current or ""
    if any(item.split("=", 1)[0] == TUNABLE for item in current.split(":")):
        return None
    return ":".join(item for item in (current, f"{TUNABLE}=1") if item)


def huge_pages_available(setting_file: str = THP_SETTING) -> bool:
    """Whether the kernel gives transparent huge pages to a program that asks (mode ``always`` or
    ``madvise``; ``never`` or no such file: no)."""
    try:
        with open(setting_file) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def reexec_with_huge_pages() -> None:
    """Replaces this process by the same command with ``glibc.malloc.hugetlb=1`` (see the module
    docstring); returns where that does not apply."""
    tunables = tunables_with_huge_pages(os.environ.get("GLIBC_TUNABLES"))
    if tunables is None or sys.platform != "linux" or not sys.executable or not huge_pages_available():
        return
    if platform.libc_ver()[0] != "glibc":  # e.g. musl: no such tunable
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, dict(os.environ, GLIBC_TUNABLES=tunables))

