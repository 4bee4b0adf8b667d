"""`python -m otel_ebpf` is the same as the `otel-ebpf` console script."""

from otel_ebpf.cli import main

raise SystemExit(main())
