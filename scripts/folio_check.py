"""How the page cache holds files: each file mapped, every page touched (as safe_open and
load_file do) and then every byte read (one core), this process's smaps entry for the mapping —
how much of it the kernel mapped with 2 MiB page-table entries (FilePmdMapped: the file's folios
are 2 MiB) — and the two times.

    python3 scripts/folio_check.py FILE...

Issue 23: decoded cache files loaded after a remount at 0.43-0.90x of the plain files on 16 cores;
on the development VM the cache files written by pwrite had no PMD mappings where the plain files
(read back into the page cache by readahead) had them.
"""
import mmap
import os
import re
import sys
import time

import numpy


def smaps_of(path):
    """The smaps fields of this process's mapping of `path` (the first one)."""
    fields, inside = {}, False
    for line in open("/proc/self/smaps"):
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
            if inside:
                break
            inside = line.split()[-1] == path
        elif inside:
            key, _, value = line.partition(":")
            if key in ("Rss", "FilePmdMapped"):
                fields[key] = int(value.split()[0])
    return fields


def check(path):
    path = os.path.realpath(path)
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    start = time.perf_counter()
    words = numpy.frombuffer(m, dtype=numpy.uint8)
    int(words[::4096].sum())  # one byte of every page: the page faults
    secs = time.perf_counter() - start
    start = time.perf_counter()
    int(words[: size // 8 * 8].view(numpy.uint64).sum())  # every byte, once mapped: TLB misses
    read = time.perf_counter() - start
    del words
    f = smaps_of(path)
    m.close()
    os.close(fd)
    rss, pmd = f.get("Rss", 0), f.get("FilePmdMapped", 0)
    print(f"{os.path.basename(path)[:40]:40} {size / 1e6:7.1f} MB  touched {secs * 1e3:5.1f} ms, read "
          f"{size / read / 1e9:5.2f} GB/s  Rss {rss / 1024:6.1f} MiB  FilePmdMapped {pmd / 1024:6.1f} MiB "
          f"({100 * pmd / max(rss, 1):.0f} %)")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for p in sys.argv[1:]:
        check(p)
