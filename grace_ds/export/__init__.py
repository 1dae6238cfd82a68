"""Export of trained students: packing of the integer weights (pack.py: our layout and AutoAWQ's GEMM
layout), checkpoint conversion with bit-exact verification (convert.py), and the loader that turns a
packed checkpoint into a runnable transformers model whose linears call the W4A16 kernel (load.py).
See docs/export.md."""
from grace_ds.export.pack import from_awq, pack_int4, to_awq, unpack_int4  # noqa: F401
