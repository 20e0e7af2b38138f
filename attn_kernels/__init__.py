"""attn_kernels: fused attention kernels for PyTorch (Triton), SDPA-compatible."""

from .api import (
    BackendStatus,
    attention_weights,
    available_backends,
    dropout_keep_mask,
    fused_attention,
    fused_attention_varlen,
    fused_attention_with_kvcache,
)
from .packing import pack, unpack
from . import distributed  # context parallelism; needs no initialised process group to import

__version__ = "0.2.0"

__all__ = [
    "fused_attention",
    "fused_attention_varlen",
    "fused_attention_with_kvcache",
    "attention_weights",
    "dropout_keep_mask",
    "available_backends",
    "pack",
    "unpack",
    "BackendStatus",
    "distributed",
    "__version__",
]
