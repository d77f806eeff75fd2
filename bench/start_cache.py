#!/usr/bin/env python3
"""Page-cache control for `npm run bench:start` (bench/start.ts runs it before each measurement).

    python3 bench/start_cache.py evict FILE...      fsync, then posix_fadvise(POSIX_FADV_DONTNEED) each file; where
                                                    over 1% stays cached, /proc/sys/vm/drop_caches too (if writable)
    python3 bench/start_cache.py resident FILE...   only count what is cached

Prints one JSON object on stdout: {"bytes": total size, "residentBytes": bytes of the files in the page cache
afterwards (mincore over a private read mapping), "dropCaches": whether drop_caches was written}. No root is needed:
an unprivileged fadvise evicts the clean pages of files that no process maps. A file that cannot be opened exits 2
with one line on stderr.
"""
import ctypes
import json
import mmap
import os
import sys

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))
EVEN_BYTES = bytes(range(0, 256, 2))


def fail(message):
    print(f"start_cache: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def evict(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_bytes(path):
    """Bytes of `path` in the page cache: mincore over a private mapping, which reads no page."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
        try:
            view = ctypes.c_char.from_buffer(mapping)
            try:
                if LIBC.mincore(ctypes.addressof(view), size, vec) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"mincore: {os.strerror(err)}")
            finally:
                del view
        finally:
            mapping.close()
    # Bit 0 of each byte: the page is resident (the other bits are reserved).
    return len(bytes(vec).translate(None, EVEN_BYTES)) * mmap.PAGESIZE


def drop_caches():
    """Drops the whole clean page cache where this process may (root); harmless otherwise."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def main(argv):
    if len(argv) < 2 or argv[0] not in ("evict", "resident"):
        fail("usage: start_cache.py evict|resident FILE...")
    files = argv[1:]
    for path in files:
        if not os.path.isfile(path):
            fail(f"{path}: not a file")
    dropped = False
    total = sum(os.path.getsize(p) for p in files)
    if argv[0] == "evict":
        for path in files:
            evict(path)
        # The whole machine's cache only where fadvise left more than 1% of the files cached.
        if sum(resident_bytes(p) for p in files) > total / 100:
            dropped = drop_caches()
    resident = sum(min(resident_bytes(p), os.path.getsize(p)) for p in files)
    print(json.dumps({"bytes": total, "residentBytes": resident, "dropCaches": dropped}))


if __name__ == "__main__":
    main(sys.argv[1:])
