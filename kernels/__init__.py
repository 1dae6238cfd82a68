"""GRACE-DS custom kernels (see kernels/README.md)."""
