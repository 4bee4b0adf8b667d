"""py_loop.py - a CPU-bound pure-Python loop that counts its own progress, for
bench/pyprofile.py (the Python counterpart of cpu_loop.c).

Usage: python3 py_loop.py COUNTER_FILE MAX_SECONDS
Runs fixed work units until killed or MAX_SECONDS pass, and after each unit stores the
number of units done so far in the first 8 bytes of COUNTER_FILE, mapped shared. A unit
walks a chain of 1..16 nested Python calls (a different depth each unit: the profiler sees
a dozen distinct Python stacks) and runs ~2k bytecode-heavy steps.
"""

import mmap
import os
import struct
import sys
import time


def work(depth, seed):
    if depth:
        return work(depth - 1, seed)
    x = seed
    for _ in range(500):
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF
    return x


def main():
    path, max_s = sys.argv[1], float(sys.argv[2])
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, 4096)
    counter = mmap.mmap(fd, 4096)
    end = time.monotonic() + max_s
    units, seed = 0, 1
    while True:
        seed = work(1 + units % 16, seed)
        units += 1
        struct.pack_into("Q", counter, 0, units)
        if units % 1000 == 0 and (time.monotonic() > end or os.getppid() == 1):
            break


if __name__ == "__main__":
    main()
