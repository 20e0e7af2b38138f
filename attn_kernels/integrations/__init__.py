"""Integrations of attn_kernels with other libraries (each imported on its own)."""
