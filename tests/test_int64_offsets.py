"""64-bit address arithmetic in the Triton kernels, checked without a 4 GiB tensor.

A packed batch of ~500k tokens (Hq = 32, D = 128) puts `q_start * stride_qm` past
2^31; so does a row index times a row stride in a long sequence, or `rows * S` in an
L x S buffer. The kernels form such products in int64 once per program or per tile,
and multiply strides in int32 only by offsets inside a tile (tl.arange, or a
remainder by a constant). This test compiles every kernel for sm_90 (nothing runs:
bench/kernel_resources.py's stand-in driver), reads the Triton IR and fails on any
int32 multiply of a stride (or of L, S) by anything else. The GPU test at the end
runs a packed batch with more than 2^31 elements when the GPU has the memory.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import HAS_CUDA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# compiles the kernels with the launch paths users reach: packed causal + dropout,
# float mask with its gradient, weights, decode (contiguous and paged), dropout mask,
# and the one-pass backward (variant "onepass") of both backward calls
_COMPILE_ALL = r"""
import os, sys, torch
sys.path.insert(0, os.path.join(sys.argv[2], "bench"))
from kernel_resources import compiling_only
from attn_kernels.triton import launch, attention_decode, dropout_mask

out_dir = sys.argv[1]
f16 = torch.float16
Hq, Hkv, D = 4, 2, 64
q, k = torch.empty(100, Hq, D, dtype=f16), torch.empty(100, Hkv, D, dtype=f16)
cu = torch.tensor([0, 40, 100], dtype=torch.int32)
packed = launch.Packed(cu, cu, 60, 60)
seed = torch.zeros(1, dtype=torch.int64)
varlen = launch.score_mods(q, 0.1, band=(None, 0), packed=packed, seed=seed, dropout_p=0.1)
qp, kp = torch.empty(2, Hq, 60, D, dtype=f16), torch.empty(2, Hkv, 60, D, dtype=f16)
masked = launch.score_mods(qp, 0.1, mask=torch.empty(2, Hq, 60, 60, dtype=f16))
qd = torch.empty(2, 1, Hq, D, dtype=f16)
cache = torch.empty(2, 64, Hkv, D, dtype=f16)
paged = torch.empty(8, 16, Hkv, D, dtype=f16)
seqlens = torch.tensor([10, 50], dtype=torch.int32)
table = torch.zeros(2, 4, dtype=torch.int32)
out, lse = torch.empty(2, 1, Hq, D, dtype=f16), torch.empty(2, Hq, 1)
dec = dict(num_splits=2, split_len=64, scale=0.1, is_causal=True, window=(-1, -1), softcap=0.0)
with compiling_only(90) as compiled:
    launch.forward(q, k, k.clone(), varlen, packed)
    launch.backward(q.clone(), q, k, k.clone(), q.clone(), torch.empty(Hq, 100), None, varlen, packed)
    launch.backward(qp.clone(), qp, kp, kp.clone(), qp.clone(), torch.empty(2, Hq, 60), None, masked, None,
                    need_ds=True)
    launch.weights(qp, kp, masked)
    attention_decode.attention_decode(qd, cache, cache, seqlens, None, None, out, lse, **dec)
    attention_decode.attention_decode(qd, paged, paged, seqlens, table, None, out, lse, **dec)
    dropout_mask.dropout_mask(seed, 2, Hq, 60, 60, 0.1, "cpu")
    os.environ["ATTN_KERNELS_TRITON_VARIANT"] = "onepass"  # the one-pass backward (preprocess + 1 kernel)
    launch.backward(q.clone(), q, k, k.clone(), q.clone(), torch.empty(Hq, 100), None, varlen, packed)
    launch.backward(qp.clone(), qp, kp, kp.clone(), qp.clone(), torch.empty(2, Hq, 60), None, masked, None,
                    need_ds=True)
for i, (name, kernel) in enumerate(compiled):
    with open(os.path.join(out_dir, f"{i:02d}_{name}.ttir"), "w") as f:
        f.write(kernel.asm["ttir"])
"""

_DEF = re.compile(r"^\s*(%[\w.#]+)(?::\d+)? = ([\w.]+)\s*(.*)$")
_OPERAND = re.compile(r"(%[\w.#]+)")
_MULI = re.compile(r"(%[\w.#]+), (%[\w.#]+) : (.*?) loc")
_WATCHED = re.compile(r"^%(stride_\w+|L|S)$")  # strides, and the L x S buffers' row length
_SHAPE_ONLY = ("tt.splat", "tt.expand_dims", "tt.broadcast")


def _definitions(ttir: str) -> dict:
    """SSA name -> (op, operand text) for every op of the IR."""
    return {m.group(1): (m.group(2), m.group(3)) for m in map(_DEF.match, ttir.splitlines()) if m}


def _source(name: str, defs: dict) -> str:
    """Follow splat / expand_dims / broadcast back to the value they reshape."""
    while name in defs and defs[name][0] in _SHAPE_ONLY:
        name = _OPERAND.match(defs[name][1]).group(1)
    return name


def _bounded_by_tile(name: str, defs: dict) -> bool:
    """tl.arange, a constant, or a remainder by a constant: smaller than a tile or block."""
    op, rest = defs.get(name, ("argument", ""))
    if op in ("tt.make_range", "arith.constant"):
        return True
    if op in ("arith.remsi", "arith.remui"):
        divisor = _source(_MULI.match(rest).group(2), defs)
        return defs.get(divisor, ("",))[0] == "arith.constant"
    return False


def int32_stride_products(ttir: str) -> list:
    """Every int32 multiply of a stride (or L, S) by a value not bounded by a tile."""
    defs = _definitions(ttir)
    found = []
    for name, (op, rest) in defs.items():
        match = _MULI.match(rest) if op == "arith.muli" else None
        if match is None or "i64" in match.group(3):
            continue
        a, b = (_source(x, defs) for x in match.group(1, 2))
        for watched, other in ((a, b), (b, a)):
            if _WATCHED.match(watched) and not _bounded_by_tile(other, defs):
                found.append(f"{name} = {watched} * {other} ({defs.get(other, ('argument',))[0]}) : {match.group(3)}")
    return found


@pytest.fixture(scope="module")
def kernel_irs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ttir")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", _COMPILE_ALL, str(out), ROOT], env=env, cwd=ROOT, check=True,
                   capture_output=True, text=True, timeout=600)
    irs = {p.name: p.read_text() for p in sorted(out.iterdir())}
    # fwd, 3 + 3 bwd, fwd + weights, 2 x (split + combine), dropout mask, 2 + 2 one-pass bwd
    assert len(irs) == 18, sorted(irs)
    assert sum("bwd_onepass_kernel" in name for name in irs) == 2, sorted(irs)
    return irs


def test_every_kernel_forms_large_offsets_in_int64(kernel_irs):
    bad = {name: found for name, found in ((n, int32_stride_products(ir)) for n, ir in kernel_irs.items()) if found}
    assert not bad, "int32 address products that can pass 2^31:\n" + "\n".join(
        f"{name}: {line}" for name, lines in bad.items() for line in lines)


def test_the_check_finds_an_int32_row_product():
    # the pattern the kernels had before (q_start * stride_qm and rows * stride in int32)
    ttir = """
    %q_start = tt.load %CuSeqQ : !tt.ptr<i32> loc(#loc1)
    %Q_1 = arith.muli %q_start, %stride_qm : i32 loc(#loc2)
    %r = tt.make_range {end = 64 : i32, start = 0 : i32} : tensor<64xi32> loc(#loc3)
    %m0 = tt.splat %start : i32 -> tensor<64xi32> loc(#loc4)
    %rows = arith.addi %m0, %r : tensor<64xi32> loc(#loc5)
    %s = tt.splat %stride_qm : i32 -> tensor<64xi32> loc(#loc6)
    %ok = arith.muli %r, %s : tensor<64xi32> loc(#loc7)
    %bad = arith.muli %rows, %s : tensor<64xi32> loc(#loc8)
    %wide = arith.muli %q64, %stride64 : i64 loc(#loc9)
    """
    found = int32_stride_products(ttir)
    assert [line.split(" = ")[0] for line in found] == ["%Q_1", "%bad"]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_packed_batch_past_2_31_elements():
    """Forward and backward of a packed batch whose q, k, v, out and grads each hold
    more than 2^31 elements; the last sequence (entirely past 2^31) against the reference."""
    from attn_kernels import fused_attention, fused_attention_varlen

    H, D, seq = 8, 128, 4096
    num_seqs = 2**31 // (H * D * seq) + 2
    total = num_seqs * seq
    need = 12 * total * H * D * 2  # q, k, v, out, dout, dq, dk, dv (bf16) plus slack
    if torch.cuda.get_device_properties(0).total_memory < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of GPU memory")
    assert total * H * D > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(total, H, D, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
               for _ in range(3))
    cu = torch.arange(0, total + 1, seq, device="cuda", dtype=torch.int32)
    out = fused_attention_varlen(q, k, v, cu, cu, seq, seq, is_causal=True, backend="triton")
    dout = torch.randn(out.shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    # the last sequence lies wholly past 2^31 elements; the first, below: same accuracy
    errors = []
    for part in (slice(0, seq), slice(total - seq, total)):
        qs, ks, vs = (t[part].detach().transpose(0, 1).float().requires_grad_() for t in (q, k, v))
        ref = fused_attention(qs, ks, vs, is_causal=True, backend="reference")
        gref = torch.autograd.grad(ref, (qs, ks, vs), dout[part].transpose(0, 1).float())
        errors.append([(got[part].transpose(0, 1).float() - want).abs().max().item()
                       for got, want in zip((out, dq, dk, dv), (ref, *gref))])
    first, last = errors
    assert all(b <= 2 * a + 1e-3 for a, b in zip(first, last)), f"past 2^31 {last} vs below {first}"
