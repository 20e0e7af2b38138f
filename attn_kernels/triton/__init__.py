"""Triton kernels of attn_kernels, one operation per module.

Nothing here is imported by `import attn_kernels`: the modules are loaded on first
use, so that `TRITON_INTERPRET=1` set before that use still takes effect.
"""
