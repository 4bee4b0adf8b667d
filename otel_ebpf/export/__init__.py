"""Records -> OTLP (and the human summary). Exporters never know which probe produced a
record."""
