"""Keep freed CPU memory in the process for the next step instead of handing it back to the OS.

A training or evaluation step on the CPU allocates and frees the same large activation buffers every
iteration (tens of MB each). glibc's allocator serves blocks above its mmap threshold with fresh ``mmap``
pages and unmaps them when freed, and it trims the top of its heap once more than its trim threshold is
free there. Either way the next step gets pages the kernel has to fault in and zero again, and that cost
lands on whichever operation first writes the buffer (GELU, layer norm, copies). Raising both thresholds
keeps the pages mapped: a ViT-B/16 training step at 256x128, batch 16, on one thread spent 0.5-1 s of
its 7-8 s in such faults. This is the same effect as running under jemalloc or tcmalloc,
which Intel's PyTorch CPU guides recommend, without preloading a library.

The process keeps at most its peak footprint, which the next step needs again anyway. Only glibc on Linux
has these knobs; elsewhere this does nothing.
"""
import ctypes
import ctypes.util
import functools
import logging
import platform

logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to 1 GiB come from the heap; larger ones (a whole dataset array) still get their own mapping.
MMAP_THRESHOLD_BYTES = 1 << 30
# Free memory at the top of the heap is returned to the OS only above 2 GiB - 1 (mallopt takes an int).
TRIM_THRESHOLD_BYTES = (1 << 31) - 1


def has_glibc_allocator():
    """Whether this process allocates with glibc's malloc (Linux with glibc), the one with these thresholds."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@functools.cache
def retain_freed_cpu_memory():
    """Raise glibc's mmap and trim thresholds for this process (once); returns whether they are set."""
    if not has_glibc_allocator():
        logger.info("CPU memory: the allocator is not glibc's (%s), DIST.KEEP_FREED_CPU_MEMORY has no effect",
                    platform.libc_ver()[0] or platform.system())
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not (libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(MMAP_THRESHOLD_BYTES))
            and libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(TRIM_THRESHOLD_BYTES))):
        logger.info("CPU memory: glibc refused the thresholds, DIST.KEEP_FREED_CPU_MEMORY has no effect")
        return False
    logger.info("CPU memory: freed blocks up to %d MiB stay in the process for reuse (DIST.KEEP_FREED_CPU_MEMORY)",
                MMAP_THRESHOLD_BYTES >> 20)
    return True
