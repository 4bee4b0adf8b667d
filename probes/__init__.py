"""The BPF C sources (<probe>.bpf.c) and their shared headers, installed as the package
otel_ebpf.bpf (pyproject.toml maps it to this directory).

This file makes it a regular package rather than a namespace one, so that the import
system knows its one real directory in an editable checkout, a wheel and the container
image alike: BCC needs that directory on disk for #include "rate_limit.h". Nothing else
here is Python; see otel_ebpf.kernel.engine.bpf_source_dir.
"""
