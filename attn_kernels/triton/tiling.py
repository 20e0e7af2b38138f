"""@triton.jit helpers shared by the attention kernels: which tile a program owns,
and how the backward kernels read the forward's LSE."""

import triton
import triton.language as tl

from .launch_config import LOG2E

_LOG2E = tl.constexpr(LOG2E)


@triton.jit
def split_program_id(pid, num_blocks, H, GROUP):
    """1-D program id -> (block along the sequence, z * H + h, z, h, h // GROUP).

    The blocks of one head get adjacent ids, so they run together and share K/V in L2.
    z and h come back as int64 so that base offsets of large tensors cannot overflow.
    """
    block = pid % num_blocks
    off_zh = pid // num_blocks
    off_z = (off_zh // H).to(tl.int64)
    off_h = (off_zh % H).to(tl.int64)
    return block, off_zh, off_z, off_h, off_h // GROUP


@triton.jit
def lse_base2(lse):
    """The forward's natural-log LSE in base 2, for recomputing P = exp2(s2 - lse2).
    lse = -inf (a row with no allowed key) becomes +inf, so its P is 0, not NaN."""
    return tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
