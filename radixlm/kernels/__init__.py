"""The engine's kernels, one module each: Triton kernels for the GPU (``decode_attention``, ``extend_attention``,
``fused_ops``) and C kernels for the CPU (``cpu``).

Nothing is imported here: importing a Triton module decorates its kernels, which must happen after a test has
chosen the Triton interpreter, and CPU-only code never needs triton at all.
"""
