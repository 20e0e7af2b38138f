"""attn_kernels: fused attention kernels for PyTorch (Triton), SDPA-compatible."""

from .api import BackendStatus, attention_weights, available_backends, fused_attention

__version__ = "0.1.0"

__all__ = ["fused_attention", "attention_weights", "available_backends", "BackendStatus", "__version__"]
