"""The CUDA C++ backend: hand-written FlashAttention-2 kernels (csrc/) as torch ops.

    fused_attention(q, k, v, is_causal, scale, deterministic) -> (out, lse)
    status() -> (available, why)          never raises
    refusal(spec) -> Exception or None    what a call to this backend would raise

Math, in the notation of reference.py: out = softmax(scale * q k^T [causal]) v and
lse = logsumexp of the scores (float32, natural log), for q (Z, Hq, L, E), k (Z, Hkv,
S, E), v (Z, Hkv, S, E), Hq a multiple of Hkv (GQA: query head h reads key/value head
h // (Hq / Hkv)); causal is top-left aligned (query i sees keys 0..i), as SDPA's.

The kernels live in the pybind11 module `attn_kernels._C` (built by setup.py with nvcc,
linked against the CUDA runtime only, never libtorch), imported on first use. They
are wrapped as the custom ops `attn_kernels::cuda_fwd` and `attn_kernels::cuda_bwd`,
registered when this module is imported (with or without `_C`), with fake (meta)
implementations and autograd, so `torch.compile(fullgraph=True)` traces through them
without a graph break. The kernels keep the log-sum-exp in base 2 (lse2 = lse / ln 2):
the backward recomputes the probabilities from it with no change of base, so a row
with one visible key gets P == 1 exactly at any score magnitude; cuda_fwd also returns
the natural-log lse (lse2 * ln 2, one elementwise op), the one users see, and its
gradient reaches the backward as the gradient of that natural-log lse. The ops pass
`data_ptr()`, strides and the current stream to `_C`; inputs are copied only when
their layout does not fit the kernels (last dim not contiguous, strides not multiples
of 8 elements, pointer not 16-byte aligned).

Limits: float16 / bfloat16; E = Ev in {32, 64, 96, 128, 256}; no attn_mask, dropout,
sliding window, softcap, ALiBi or bottom-right causal with L != S (see `refusal`);
sm_80 or newer. The backward never uses atomics (dK/dV are summed over a GQA group in
registers, dQ has its own kernel), so it is bit-reproducible run to run and
`deterministic` changes nothing. The gradient reaching lse is honoured
(delta = rowsum(dO * O) - dlse). The ops have no double backward.
"""

import contextlib
import functools
import importlib
import math
import re
from typing import Optional, Tuple

import torch

from ._checks import AttentionSpec
from ._kernel_inputs import as_4d

HEAD_DIMS = (32, 64, 96, 128, 256)
LN2 = math.log(2.0)
LOG2E = 1.0 / LN2
DTYPES = (torch.float16, torch.bfloat16)
NOT_BUILT = "attn_kernels._C was not built (no nvcc at install time, or ATTN_KERNELS_SKIP_CUDA_BUILD=1)"


@functools.lru_cache(maxsize=None)
def _extension():
    """(the _C module, None), or (None, why it cannot be imported)."""
    try:
        return importlib.import_module("attn_kernels._C"), None
    except ModuleNotFoundError as exc:
        if exc.name == "attn_kernels._C":
            return None, NOT_BUILT
        return None, f"attn_kernels._C cannot be imported: {exc}"
    except (ImportError, OSError) as exc:  # built, but e.g. for another Python or libstdc++
        return None, f"attn_kernels._C was built but cannot be imported: {exc}"


def _require_extension():
    module, why = _extension()
    if module is None:
        raise RuntimeError(f"backend='cuda' is unavailable: {why}")
    return module


def _arch_runs_on(archs: str, capability: tuple) -> bool:
    """Whether a build for archs ("80+PTX;90a") has code that runs on a GPU of this
    compute capability: SASS of the same major and no newer minor, an arch-specific
    (a) build of exactly this GPU, or PTX of an older or equal arch (JIT-compiled)."""
    cap = capability[0] * 10 + capability[1]
    for entry in archs.split(";"):
        ptx = entry.endswith("+PTX")
        match = re.fullmatch(r"(\d+)([af]?)", entry[: -len("+PTX")] if ptx else entry)
        if match is None:
            return True  # an unknown build: let the launch say
        num, suffix = int(match.group(1)), match.group(2)
        if suffix == "a" and num == cap:
            return True
        if suffix != "a" and num // 10 == capability[0] and num <= cap:
            return True
        if ptx and num <= cap:
            return True
    return False


@functools.lru_cache(maxsize=None)
def _device_status(index: int) -> Tuple[bool, str]:
    module, _ = _extension()
    ok, _, error = module.runtime_status()
    version = module.CUDA_RUNTIME_VERSION
    if not ok:
        return False, (
            f"attn_kernels._C (CUDA runtime {version // 1000}.{version % 1000 // 10}) cannot use the GPU: {error}"
        )
    name = torch.cuda.get_device_name(index)
    capability = torch.cuda.get_device_capability(index)
    sm = f"sm_{capability[0]}{capability[1]}"
    if capability < (8, 0):
        return False, f"the CUDA kernels need sm_80 or newer (mma.sync bf16, cp.async); {name} is {sm}"
    if not _arch_runs_on(module.ARCHS, capability):
        return False, (
            f"attn_kernels._C was compiled for {module.ARCHS}, which cannot run on {name} ({sm}); "
            f"reinstall with ATTN_KERNELS_CUDA_ARCHS including {capability[0]}{capability[1]}"
        )
    return True, f"CUDA tensors on {name} ({sm}): float16/bfloat16, head dims {', '.join(map(str, HEAD_DIMS))}"


@functools.lru_cache(maxsize=None)
def _smem_shortfall(index: int, head_dim: int) -> Optional[str]:
    """Why this GPU cannot give the kernels of head_dim their shared memory, or None."""
    module, _ = _extension()
    need = module.smem_bytes(head_dim)
    props = torch.cuda.get_device_properties(index)
    have = getattr(props, "shared_memory_per_block_optin", None)
    if have is None or need <= have:
        return None
    return (f"head dim {head_dim} on {props.name}: its kernels need {need // 1024} KB of shared memory "
            f"per block, the GPU allows {have // 1024} KB")


def _status(index: Optional[int] = None) -> Tuple[bool, str]:
    module, why = _extension()
    if module is None:
        return False, why
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return False, "attn_kernels._C is built, but this torch is a CPU-only build (no CUDA)"
        return False, "attn_kernels._C is built, but torch sees no CUDA GPU"
    return _device_status(torch.cuda.current_device() if index is None else index)


def status() -> Tuple[bool, str]:
    """(True, what it runs on) if backend "cuda" can run here, else (False, why not)."""
    try:
        return _status()
    except Exception as exc:  # a status query must never raise
        return False, f"could not query the CUDA backend: {type(exc).__name__}: {exc}"


def _missing_feature(spec: AttentionSpec) -> Optional[str]:
    if spec.has_mask:
        return "attn_mask (only is_causal masking)"
    if spec.dropout_p > 0.0:
        return "dropout (dropout_p > 0)"
    if tuple(spec.window) != (-1, -1):
        return "sliding windows (window_size)"
    if spec.softcap > 0.0:
        return "softcap"
    if spec.has_alibi:
        return "ALiBi (alibi_slopes)"
    if spec.is_causal and spec.causal_bottom_right and spec.len_q != spec.len_k:
        return "bottom-right aligned causal masks (causal_lower_right) with L != S"
    if spec.dtype not in DTYPES:
        return f"{spec.dtype} inputs (float16 and bfloat16 only)"
    if spec.dim_v != spec.dim_qk:
        return f"a value head dim different from the query's (E={spec.dim_qk}, Ev={spec.dim_v})"
    if spec.dim_qk not in HEAD_DIMS:
        return f"head dim {spec.dim_qk} (compiled: {', '.join(map(str, HEAD_DIMS))})"
    return None


def refusal(spec: AttentionSpec) -> Optional[Exception]:
    """The exception a call described by spec would raise on this backend, or None.

    NotImplementedError for what the kernels lack (checked first, so it does not
    depend on the machine), RuntimeError when the backend cannot run here, ValueError
    for tensors that are not on a CUDA device, and NotImplementedError again for a head
    dim whose kernels need more shared memory than this GPU gives a block (256 on
    GPUs with 99 KB per block, e.g. sm_86 / sm_89)."""
    try:
        missing = _missing_feature(spec)
        if missing is not None:
            return NotImplementedError(f"backend='cuda' does not support {missing}; use backend='triton'")
        on_cuda = spec.device.type == "cuda"
        index = spec.device.index if on_cuda else None
        if on_cuda and index is None:
            index = torch.cuda.current_device()
        ok, why = _status(index)
        if not ok:
            return RuntimeError(f"backend='cuda' is unavailable: {why}")
        if not on_cuda:
            return ValueError(f"backend='cuda' takes CUDA tensors, got {spec.device.type} tensors")
        shortfall = _smem_shortfall(index, spec.dim_qk)
        if shortfall is not None:
            return NotImplementedError(f"backend='cuda' does not support {shortfall}; use backend='triton'")
        return None
    except Exception as exc:  # never raise from a query
        return RuntimeError(f"backend='cuda' is unavailable: {type(exc).__name__}: {exc}")


# ----------------------------------------------------------------------------- ops


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shape / dtype checks of the ops (also run on fake tensors)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"cuda ops take 4-D (Z, H, N, D) tensors, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise TypeError(f"cuda ops take float16 or bfloat16 q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    Z, Hq, _, E = q.shape
    if k.shape[0] != Z or v.shape[0] != Z or k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2] or k.shape[3] != E:
        raise ValueError(f"inconsistent shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] == 0 or Hq % k.shape[1] != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]})")
    if v.shape[3] != E or E not in HEAD_DIMS:
        raise NotImplementedError(f"cuda ops need E = Ev in {HEAD_DIMS}, got E={E}, Ev={v.shape[3]}")


def _kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """t itself if the kernels can read it (last dim contiguous, other strides multiples
    of 8 elements, 16-byte aligned), else a contiguous copy."""
    if t.stride(-1) != 1 or any(s % 8 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1):
        t = t.contiguous()
    if t.data_ptr() % 16:
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _tensor_arg(t: torch.Tensor) -> tuple:
    # strides of size-1 dims are never used: 0 keeps them out of the alignment check
    return (t.data_ptr(), *(s if n > 1 else 0 for s, n in zip(t.stride()[:3], t.shape[:3])))


def _launch_env(t: torch.Tensor):
    """(device index, stream handle, device context) for launching on t's device. CPU
    tensors only reach here from the CPU emulator of the kernels (csrc/emulator)."""
    if t.device.type == "cuda":
        return t.device.index, torch.cuda.current_stream(t.device).cuda_stream, torch.cuda.device(t.device)
    return -1, 0, contextlib.nullcontext()


def _dtype_code(module, dtype: torch.dtype) -> int:
    return module.FLOAT16 if dtype == torch.float16 else module.BFLOAT16


def _forward_impl(module, q, k, v, is_causal: bool, scale: float):
    """The forward on `module` (attn_kernels._C, or the emulator): (out (Z, Hq, L, E),
    lse2 float32 (Z, Hq, L), the log-sum-exp in base 2), contiguous."""
    _check_inputs(q, k, v)
    Z, Hq, L, E = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    out = torch.empty((Z, Hq, L, E), dtype=q.dtype, device=q.device)
    lse2 = torch.empty((Z, Hq, L), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse2
    if S == 0:  # no keys: every row is empty
        return out.zero_(), lse2.fill_(-math.inf)
    q, k, v = (_kernel_layout(t) for t in (q, k, v))
    device, stream, context = _launch_env(q)
    with context:
        module.forward(
            _dtype_code(module, q.dtype), _tensor_arg(q), _tensor_arg(k), _tensor_arg(v), _tensor_arg(out),
            lse2.data_ptr(), (Z, Hq, Hkv, L, S, E), float(scale), bool(is_causal), device, stream,
        )
    return out, lse2


def _natural_lse(lse2: torch.Tensor) -> torch.Tensor:
    """The user-visible lse (natural log) of the kernels' base-2 lse2."""
    return lse2 * LN2


def _backward_impl(module, dout, q, k, v, out, lse2, dlse, is_causal: bool, scale: float):
    """The backward on `module`: (dq, dk, dv), contiguous. lse2 is the forward's base-2
    log-sum-exp; dlse (or None) is the gradient reaching the natural-log lse."""
    _check_inputs(q, k, v)
    Z, Hq, L, E = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0:  # no query or no key: no score, no gradient
        return dq.zero_(), dk.zero_(), dv.zero_()
    dout, q, k, v, out = (_kernel_layout(t) for t in (dout, q, k, v, out))
    lse2 = lse2.float().contiguous()
    dlse = dlse.float().contiguous() if dlse is not None else None
    delta = torch.empty_like(lse2)
    device, stream, context = _launch_env(q)
    with context:
        module.backward(
            _dtype_code(module, q.dtype), _tensor_arg(q), _tensor_arg(k), _tensor_arg(v), _tensor_arg(out),
            _tensor_arg(dout), _tensor_arg(dq), _tensor_arg(dk), _tensor_arg(dv), lse2.data_ptr(),
            dlse.data_ptr() if dlse is not None else 0, delta.data_ptr(),
            (Z, Hq, Hkv, L, S, E), float(scale), bool(is_causal), device, stream,
        )
    return dq, dk, dv


@torch.library.custom_op("attn_kernels::cuda_fwd", mutates_args=(), device_types="cuda")
def cuda_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float, deterministic: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (Z, Hq, L, E) in q.dtype, lse float32 (Z, Hq, L) in natural log, lse2 the same
    in base 2, what the backward takes); deterministic is for the backward."""
    out, lse2 = _forward_impl(_require_extension(), q, k, v, is_causal, scale)
    return out, _natural_lse(lse2), lse2


@cuda_fwd.register_fake
def _cuda_fwd_fake(q, k, v, is_causal, scale, deterministic):
    _check_inputs(q, k, v)
    Z, Hq, L, E = q.shape
    stats = q.new_empty((Z, Hq, L), dtype=torch.float32)
    return q.new_empty((Z, Hq, L, E)), stats, torch.empty_like(stats)


@torch.library.custom_op("attn_kernels::cuda_bwd", mutates_args=(), device_types="cuda")
def cuda_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse2: torch.Tensor,
    dlse: Optional[torch.Tensor],
    is_causal: bool,
    scale: float,
    deterministic: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous; lse2 is cuda_fwd's base-2 lse, dlse (or None) the gradient
    reaching its natural-log lse."""
    return _backward_impl(_require_extension(), dout, q, k, v, out, lse2, dlse, is_causal, scale)


@cuda_bwd.register_fake
def _cuda_bwd_fake(dout, q, k, v, out, lse2, dlse, is_causal, scale, deterministic):
    _check_inputs(q, k, v)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, is_causal, scale, deterministic = inputs
    out, _, lse2 = output
    ctx.save_for_backward(q, k, v, out, lse2)
    ctx.flags = (is_causal, scale, deterministic)


def _natural_lse_grad(dlse: Optional[torch.Tensor], dlse2: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The gradient reaching the natural-log lse from those reaching cuda_fwd's lse and
    lse2 outputs (lse2 = lse * log2(e)); None when neither was used."""
    if dlse2 is None:
        return dlse
    return dlse2 * LOG2E if dlse is None else dlse + dlse2 * LOG2E


def _backward(ctx, dout, dlse, dlse2):
    q, k, v, out, lse2 = ctx.saved_tensors
    if dout is None:  # only lse was used downstream
        dout = torch.zeros_like(out)
    dlse = _natural_lse_grad(dlse, dlse2)
    dq, dk, dv = torch.ops.attn_kernels.cuda_bwd(dout, q, k, v, out, lse2, dlse, *ctx.flags)
    return dq, dk, dv, None, None, None


cuda_fwd.register_autograd(_backward, setup_context=_setup_context)


def fused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float, deterministic: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out (Z, Hq, L, E) in q.dtype, lse float32 (Z, Hq, L), natural log) for CUDA
    tensors q (Z, Hq, L, E), k (Z, Hkv, S, E), v (Z, Hkv, S, E) of any strides;
    differentiable in q, k, v (and through lse). The caller has checked the call with
    `refusal`."""
    out, lse, _ = torch.ops.attn_kernels.cuda_fwd(q, k, v, bool(is_causal), float(scale), bool(deterministic))
    return out, lse


def attention(query, key, value, spec: AttentionSpec, deterministic: bool):
    """api.py's entry: `fused_attention` on (Z, H, N, D) views of the caller's
    (*batch, H, N, D) tensors; (out, lse) in the caller's shapes."""
    q, k, v = (as_4d(t, spec) for t in (query, key, value))
    out, lse = fused_attention(q, k, v, spec.is_causal, spec.scale, deterministic)
    return out.reshape(spec.out_shape), lse.reshape(spec.lse_shape)
