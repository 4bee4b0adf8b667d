"""User-stack unwinding without frame pointers: CFI tables for the kernel's unwinder."""
