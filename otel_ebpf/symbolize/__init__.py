"""Symbolization of sampled stacks: what a frame is (frames), kernel symbols (kallsyms),
ELF symbol tables (elf), and the per-process symbolizer that joins them (symbols)."""
