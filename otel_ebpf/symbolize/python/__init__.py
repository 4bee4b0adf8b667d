"""CPython frames for the CPU profiler: per-version layouts (layouts), which processes
are Python (process), code objects and line tables (code), the reference walk (walk), and
the user-space half of probes/python_stack.h (unwinder)."""
