"""Context parallelism (attn_kernels.distributed) on gloo: 2, 3 and 4 CPU processes.

Each spawned job runs many cases: full-sequence inputs drawn from the same seed on
every rank, sharded, run through a scheme, and compared after `unshard_sequence`
(outputs, lse, gradients of q / k / v) with one single-process call on the whole
sequence: float64 on the reference backend to 1e-10; fp32 / fp16 / bf16 through the
Triton kernels (the interpreter here) by the accuracy rule of tests/accuracy.py.
Spawning costs seconds, so the cases are grouped into a few jobs.
"""

from __future__ import annotations

import datetime
import gc
import os
import sys
import traceback
from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from accuracy import assert_within_rule, flash_style, max_err, typical
from attn_kernels import fused_attention, fused_attention_varlen
from attn_kernels.distributed import (
    allgather_attention, ring_attention, shard_sequence, ulysses_attention, unshard_sequence,
)

SCHEMES = {"ring": ring_attention, "allgather": allgather_attention, "ulysses": ulysses_attention}
FLOAT64_TOL = 1e-10


def _spawn(job, world: int, tmp_path, *args) -> None:
    """Run job(rank, world, *args) in `world` gloo processes; a failure in any re-raises here."""
    mp.spawn(_worker, args=(job, world, str(tmp_path / "store"), args), nprocs=world, join=True)


def _worker(rank, job, world, store, args):
    torch.set_num_threads(1)  # the CI machine has 2 cores for all processes
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        job(rank, world, *args)
    except BaseException:
        # printed here, because a peer that loses this rank mid-collective may abort first
        # and be the failure that spawn reports
        traceback.print_exc()
        raise
    gc.collect()  # frames of caught exceptions may still hold the group
    dist.barrier()  # no rank tears its connections down while a peer still talks to it
    dist.destroy_process_group()
    # a gloo group destroyed during interpreter shutdown (by a reference that outlived
    # destroy_process_group) can std::terminate the process: leave before that
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@dataclass(frozen=True)
class Case:
    scheme: str
    chunk: int = 3  # global length = chunk * 2W (zigzag) or chunk * W (contiguous)
    batch: int = 2
    heads_q: int = 4
    heads_kv: int = 4
    dim_qk: int = 5
    dim_v: int = 7
    kv_chunk: Optional[int] = None  # != chunk: L != S
    layout: str = "zigzag"
    is_causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    scale: Optional[float] = None
    docs: Optional[tuple] = None  # document lengths packed along the sequence (allgather)
    return_lse: bool = False
    strided: bool = False  # shards as (B, N, H, D).transpose(1, 2) views

    def lengths(self, world: int) -> tuple:
        parts = world * (2 if self.layout == "zigzag" else 1)
        return self.chunk * parts, (self.kv_chunk or self.chunk) * parts

    def kwargs(self) -> dict:
        kw = dict(is_causal=self.is_causal, scale=self.scale, enable_gqa=self.heads_q != self.heads_kv,
                  window_size=self.window, softcap=self.softcap)
        return kw


def _inputs(case: Case, world: int, dtype: torch.dtype, seed: int) -> dict:
    """Full-sequence inputs and upstream gradients, identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    L, S = case.lengths(world)
    B = case.batch

    def draw(heads, n, dim):
        if case.strided:
            return torch.randn(B, n, heads, dim, generator=gen, dtype=torch.float64).transpose(1, 2)
        return torch.randn(B, heads, n, dim, generator=gen, dtype=torch.float64)

    q, k = draw(case.heads_q, L, case.dim_qk), draw(case.heads_kv, S, case.dim_qk)
    v = draw(case.heads_kv, S, case.dim_v)
    # upstream gradients exact in the dtype of every run (out: the input dtype; lse: float32)
    dout = torch.randn(B, case.heads_q, L, case.dim_v, generator=gen, dtype=torch.float64).to(dtype).double()
    dlse = torch.randn(B, case.heads_q, L, generator=gen, dtype=torch.float64).float().double()
    return dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), dout=dout, dlse=dlse)


def _loss(out, lse, dout, dlse):
    loss = (out * dout.to(out.dtype)).sum()
    if lse is not None:
        loss = loss + (lse * dlse.to(lse.dtype)).sum()
    return loss


def _whole_sequence(case: Case, backend: str):
    """(q, k, v) -> (out, lse): one single-process call on the whole sequence."""
    def run(q, k, v):
        if case.docs is None:
            return fused_attention(q, k, v, backend=backend, return_lse=True, **case.kwargs())
        # packed documents: one varlen call per batch row (bottom-right causal = top-left per document)
        cu = torch.tensor([0, *case.docs], dtype=torch.int64).cumsum(0).to(torch.int32)
        outs, lses = [], []
        for b in range(case.batch):
            o, s = fused_attention_varlen(
                q[b].transpose(0, 1), k[b].transpose(0, 1), v[b].transpose(0, 1), cu, cu, max(case.docs),
                max(case.docs), is_causal=case.is_causal, scale=case.scale, window_size=case.window,
                softcap=case.softcap, backend=backend, return_lse=True)
            outs.append(o.transpose(0, 1))
            lses.append(s)
        return torch.stack(outs), torch.stack(lses)
    return run


def _single_process(case: Case, x: dict, dtype: torch.dtype, backend: str) -> dict:
    """out, lse, dq, dk, dv of one call on the whole sequence at `dtype`."""
    q, k, v = (x[n].detach().to(dtype).requires_grad_() for n in "qkv")
    out, lse = _whole_sequence(case, backend)(q, k, v)
    grads = torch.autograd.grad(_loss(out, lse if case.return_lse else None, x["dout"], x["dlse"]), (q, k, v))
    return dict(out=out.detach(), lse=lse.detach(), dq=grads[0], dk=grads[1], dv=grads[2])


def _distributed(case: Case, x: dict, dtype: torch.dtype, backend: str, counts=None) -> dict:
    """The same through the scheme: shard, call, backward, unshard. `counts`, if given,
    is a call counter read after the forward and after the backward."""
    shard = lambda t: shard_sequence(t, 2, layout=case.layout)  # noqa: E731
    q, k, v = (shard(x[n].detach().to(dtype)).requires_grad_() for n in "qkv")
    kw = dict(case.kwargs(), layout=case.layout, backend=backend, return_lse=True)
    if case.docs is not None:
        kw["cu_seqlens"] = torch.tensor([0, *case.docs]).cumsum(0).to(torch.int32)
    before = counts.snapshot() if counts else None
    out, lse = SCHEMES[case.scheme](q, k, v, **kw)
    forward = counts.since(before) if counts else None
    loss = _loss(out, lse if case.return_lse else None, shard(x["dout"]), shard(x["dlse"]))
    before = counts.snapshot() if counts else None
    loss.backward()
    backward = counts.since(before) if counts else None
    unshard = lambda t: unshard_sequence(t.detach(), 2, layout=case.layout)  # noqa: E731
    res = dict(out=unshard(out), lse=unshard(lse), dq=unshard(q.grad), dk=unshard(k.grad), dv=unshard(v.grad))
    return res, (forward, backward)


def _check_float64(case: Case, world: int, seed: int) -> None:
    x = _inputs(case, world, torch.float64, seed)
    expected = _single_process(case, x, torch.float64, "reference")
    got, _ = _distributed(case, x, torch.float64, "reference")
    for name, want in expected.items():
        assert got[name].shape == want.shape, (case, name)
        err = max_err(got[name], want)
        assert err <= FLOAT64_TOL, f"{case} world {world}: {name} off by {err:.3g}"


def _check_rule(case: Case, world: int, dtype: torch.dtype, seed: int) -> None:
    """Triton kernels under the scheme vs the float64 oracle, by the rule of tests/accuracy.py
    (PyTorch's error: the FlashAttention-style fp32 computation on the same inputs)."""
    x = _inputs(case, world, dtype, seed)
    ref = _single_process(case, x, torch.float64, "reference")
    ins = [x[n].detach().requires_grad_() for n in "qkv"]
    out_f, lse_f, grads_f = flash_style(_whole_sequence(case, "reference"), ins, dtype, x["dout"].to(dtype),
                                        x["dlse"].float() if case.return_lse else None)
    pytorch = dict(out=out_f, lse=lse_f, dq=grads_f[0], dk=grads_f[1], dv=grads_f[2])
    got, _ = _distributed(case, x, dtype, "triton")
    for name in ("out", "lse", "dq", "dk", "dv"):
        label = f"{case} {dtype} {name}"
        if name == "lse":
            assert_within_rule(label, got[name], ref[name], [pytorch[name]], torch.float32)
        else:
            magnitude = typical(ref["out"]) if name.startswith("d") else 0.0
            assert_within_rule(label, got[name], ref[name], [pytorch[name]], magnitude=magnitude)


def _float64_cases(world: int) -> list:
    """Every scheme, both layouts, causal and not, GQA, return_lse; plus each scheme's extras."""
    heads = {2: (4, 2), 3: (6, 3), 4: (8, 4)}[world]  # Ulysses splits heads: divisible by W
    cases = []
    for scheme in SCHEMES:
        for layout in ("zigzag", "contiguous"):
            for causal in (False, True):
                gqa = causal == (layout == "zigzag")
                cases.append(Case(scheme, layout=layout, is_causal=causal, heads_q=heads[0],
                                  heads_kv=heads[1] if gqa else heads[0], return_lse=not causal or gqa,
                                  strided=layout == "contiguous", softcap=5.0 if causal and gqa else 0.0))
    base = Case("ring", heads_q=heads[0], heads_kv=heads[0])
    n = 2 * world * 3
    cases += [
        replace(base, kv_chunk=2, return_lse=True),  # L != S (non-causal)
        replace(base, is_causal=True, chunk=1, batch=1, scale=0.3),  # one token per chunk
        replace(base, scheme="allgather", is_causal=True, window=(4, 0), return_lse=True),
        replace(base, scheme="allgather", window=(2, 3), layout="contiguous"),
        replace(base, scheme="allgather", is_causal=True, docs=(5, 1, n - 6), return_lse=True),
        replace(base, scheme="allgather", docs=(n - 7, 7), window=(3, 1), heads_kv=heads[1]),
        replace(base, scheme="allgather", kv_chunk=4),
        replace(base, scheme="ulysses", is_causal=True, window=(3, -1), return_lse=True),
        replace(base, scheme="ulysses", kv_chunk=2, layout="contiguous"),
    ]
    return cases


def _job_float64(rank, world):
    for i, case in enumerate(_float64_cases(world)):
        _check_float64(case, world, seed=1000 * world + i)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_float64_reference_matches_single_process(world, tmp_path):
    _spawn(_job_float64, world, tmp_path)


TRITON_CASES = {
    2: [
        (Case("ring", is_causal=True, heads_q=2, heads_kv=1, dim_qk=6, dim_v=6, batch=1, return_lse=True),
         torch.float32),
        (Case("ring", is_causal=True, layout="contiguous", heads_q=2, heads_kv=2, dim_qk=8, dim_v=8, batch=1,
              strided=True), torch.bfloat16),
        (Case("ring", kv_chunk=2, heads_q=2, heads_kv=2, dim_qk=8, dim_v=8, batch=1, return_lse=True),
         torch.float16),
        (Case("allgather", is_causal=True, window=(5, 0), docs=(7, 5), heads_q=2, heads_kv=1, dim_qk=8,
              dim_v=8, batch=1, return_lse=True), torch.float16),
        (Case("ulysses", is_causal=True, heads_q=2, heads_kv=2, dim_qk=8, dim_v=8, batch=1, return_lse=True),
         torch.bfloat16),
    ],
    3: [
        (Case("ring", is_causal=True, chunk=2, heads_q=2, heads_kv=1, dim_qk=8, dim_v=8, batch=1,
              return_lse=True), torch.bfloat16),
    ],
}


def _job_triton(rank, world):
    for i, (case, dtype) in enumerate(TRITON_CASES[world]):
        _check_rule(case, world, dtype, seed=2000 * world + i)


@pytest.mark.parametrize("world", sorted(TRITON_CASES))
def test_triton_kernels_match_single_process(world, tmp_path):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1")
    _spawn(_job_triton, world, tmp_path)


# ---- communication: what each scheme promises ------------------------------------


class CallCounter:
    """Counts the torch.distributed calls that attn_kernels.distributed makes."""

    def __init__(self):
        self.names = ["batch_isend_irecv", "all_to_all_single",
                      "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor",
                      "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"]
        self.counts = dict.fromkeys(self.names, 0)
        for name in self.names:
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            self.counts[name] += 1
            return fn(*args, **kwargs)
        return counted

    def snapshot(self) -> dict:
        return dict(self.counts)

    def since(self, before: dict) -> dict:
        """{short name: calls since `before`}, zero counts left out."""
        short = {self.names[0]: "p2p", self.names[1]: "all_to_all", self.names[2]: "all_gather",
                 self.names[3]: "reduce_scatter"}
        return {short[n]: self.counts[n] - before[n] for n in self.names if self.counts[n] > before[n]}


def _job_counts(rank, world):
    counts = CallCounter()
    W = world
    expected = {
        # one all-gather of the argument record per call, then the scheme's own traffic
        "ring": ({"all_gather": 1, "p2p": W - 1}, {"p2p": (W - 1) + W}),
        "allgather": ({"all_gather": 1 + 2}, {"reduce_scatter": 2}),
        "ulysses": ({"all_gather": 1, "all_to_all": 3 + 2}, {"all_to_all": 2 + 3}),  # q, k, v, out, lse
    }
    for scheme, (fwd, bwd) in expected.items():
        case = Case(scheme, is_causal=True, heads_q=2 * W, heads_kv=W, batch=1, return_lse=True)
        x = _inputs(case, W, torch.float64, seed=7)
        _, (got_fwd, got_bwd) = _distributed(case, x, torch.float64, "reference", counts)
        assert (got_fwd, got_bwd) == (fwd, bwd), f"{scheme}: forward {got_fwd}, backward {got_bwd}"


def _job_errors(rank, world):
    q = torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match=r"query.shape must be the same on every rank.*rank 1: \(1, 2, 8, 4\)"):
        k = torch.randn(1, 2, 6 + 2 * rank, 4)
        ring_attention(k, k, k)
    with pytest.raises(ValueError, match=r"sequence length 10.*layout='zigzag'.*world size 2.*divisible by 4"):
        shard_sequence(torch.randn(10, 3), 0)
    with pytest.raises(ValueError, match=r"sequence length 9.*layout='contiguous'.*world size 2"):
        shard_sequence(torch.randn(2, 9), 1, layout="contiguous")
    with pytest.raises(ValueError, match=r"local sequence length 3.*layout='zigzag'"):
        allgather_attention(*(torch.randn(1, 2, 3, 4),) * 3)
    with pytest.raises(ValueError, match="layout must be 'zigzag' or 'contiguous'"):
        ulysses_attention(q, q, q, layout="striped")
    with pytest.raises(NotImplementedError, match=r"window_size=\(4, 0\).*allgather_attention"):
        ring_attention(q, q, q, window_size=(4, 0))
    with pytest.raises(NotImplementedError, match=r"is_causal=True.*L_local=6, S_local=4"):
        ring_attention(q, q[:, :, :4], q[:, :, :4], is_causal=True)
    with pytest.raises(ValueError, match=r"query has 3 heads, which world size 2"):
        ulysses_attention(*(torch.randn(1, 3, 6, 4),) * 3)
    with pytest.raises(ValueError, match=r"key/value has 1 heads.*world size 2"):
        ulysses_attention(q, q[:, :1], q[:, :1], enable_gqa=True)
    with pytest.raises(ValueError, match=r"cu_seqlens must start at 0.*global sequence length 12"):
        allgather_attention(q, q, q, cu_seqlens=torch.tensor([0, 5, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"heads"):  # the single-device checks still apply
        kv = torch.randn(1, 3, 6, 4)
        ring_attention(q, kv, kv, enable_gqa=True)
    with pytest.raises(ValueError, match="is_causal must be the same on every rank"):
        allgather_attention(q, q, q, is_causal=rank == 0)


def _job_counts_and_errors(rank, world):
    _job_counts(rank, world)
    if world == 2:
        _job_errors(rank, world)


@pytest.mark.parametrize("world", [2, 3])
def test_communication_per_call_and_errors(world, tmp_path):
    _spawn(_job_counts_and_errors, world, tmp_path)


def test_uninitialised_process_group_is_refused():
    assert not dist.is_initialized()
    x = torch.randn(1, 2, 4, 4)
    for fn in (ring_attention, allgather_attention, ulysses_attention):
        with pytest.raises(RuntimeError, match=f"{fn.__name__} needs an initialised torch.distributed process group"):
            fn(x, x, x)
    with pytest.raises(RuntimeError, match="shard_sequence needs an initialised"):
        shard_sequence(x, 2)
    with pytest.raises(RuntimeError, match="unshard_sequence needs an initialised"):
        unshard_sequence(x, 2)
