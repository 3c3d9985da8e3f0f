#!/usr/bin/env python3
"""Writes back and drops the page cache of the files given (fsync, then
POSIX_FADV_DONTNEED), leaving every other file's cache alone.

The benchmarks use it on nbdkit-file's image after its sequential prefill:
that prefill leaves the file cached in large folios, and ext4 then walks
every block of a folio for each 4 KiB write into it; once dropped, random
4 KiB writes cache the file in 4 KiB folios."""
import os
import sys

if len(sys.argv) < 2:
    sys.exit("usage: drop_page_cache.py FILE...")
for path in sys.argv[1:]:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped: write them back first
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except OSError as e:
        sys.exit(f"drop_page_cache: {path}: {e}")
