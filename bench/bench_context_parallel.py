"""Context-parallel attention across GPUs: step time and TFLOP/s per GPU of each scheme
of `attn_kernels.distributed`, next to one GPU, with the overlap of communication.

    torchrun --nproc-per-node 8 bench/bench_context_parallel.py            # W = 8 over NCCL
    torchrun --nproc-per-node 8 bench/bench_context_parallel.py --quick
    python bench/bench_context_parallel.py                                 # one GPU: W = 1, the wrappers' overhead

Shapes: B = 1, Hq = 32, Hkv = 8, D = 128 (Llama-style GQA), bf16, causal, per-GPU length
4k / 8k / 16k (16k x 8 GPUs = 128k tokens). For each scheme and pass (fwd, fwd+bwd):
  - ms: the median step over --iters CUDA-event timings, the slowest rank's;
  - tflops_per_gpu: attention FLOPs of the whole sequence (4 B H N^2 D, half for causal,
    backward 2.5x) / W / ms;
  - single_gpu_*: plain `fused_attention` on one GPU at the same per-GPU length;
    ratio = tflops_per_gpu / single_gpu_tflops (the goal: >= 0.85 for the zigzag ring
    at 128k tokens, causal);
  - comm_ms: the scheme's communication alone (same calls, no attention), and for the
    ring (the one scheme that overlaps) hidden = (comm + compute - step) / comm, with
    compute = its block calls alone (fwd only).
With W = 1 (one GPU, or torchrun with one process) each scheme runs with no traffic
and overhead = ms / single_gpu_ms - 1 is the wrappers' own cost (goal < 3%).
Every scheme is first checked against one-GPU attention on the whole sequence; a
wrong one is reported and not timed. Rank 0 writes bench/results/<gpu>-cp-w<W>.json / .md.
Needs CUDA GPUs and NCCL: without a GPU, or with fewer GPUs than ranks, it refuses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from records import attention_flops, file_stem, machine_info, tflops  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCHEMES = ("ring", "allgather", "ulysses")
PASSES = ("fwd", "fwd_bwd")
CHECK_TOLERANCE = 2e-2  # bf16: max |out - one GPU| / max(1, max |one GPU|); a wrong mask gives ~0.1-1


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated: ring, allgather, ulysses")
    parser.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag")
    parser.add_argument("--seqlens", default="4096,8192,16384", help="per-GPU sequence lengths")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--headdim", type=int, default=128)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--no-causal", dest="causal", action="store_false")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one per-GPU length (4096), fewer iterations")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="directory for the JSON and Markdown results")
    args = parser.parse_args(argv)
    args.schemes = [s for s in args.schemes.split(",") if s]
    unknown = set(args.schemes) - set(SCHEMES)
    if unknown:
        parser.error(f"unknown schemes {sorted(unknown)}; choose from {', '.join(SCHEMES)}")
    args.seqlens = [4096] if args.quick else [int(s) for s in args.seqlens.split(",")]
    if args.quick:
        args.iters, args.warmup = 5, 2
    args.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    return args


def refusal(world: int, gpus: int) -> Optional[str]:
    """Why this machine cannot run the benchmark with `world` ranks (None: it can)."""
    if gpus == 0:
        return ("bench_context_parallel.py needs CUDA GPUs (NCCL): none found. Run it with torchrun on a node with "
                ">= 2 GPUs (torchrun --nproc-per-node N bench/bench_context_parallel.py), or on one GPU for the "
                "W = 1 overhead run; on CPU, tests/test_distributed.py checks the schemes over gloo")
    if world > gpus:
        return (f"WORLD_SIZE={world} ranks but only {gpus} GPU(s) on this node: one GPU per rank is needed "
                f"(torchrun --nproc-per-node {gpus} or fewer)")
    return None


def _scheme_fn(name: str):
    from attn_kernels import distributed as cp

    return {"ring": cp.ring_attention, "allgather": cp.allgather_attention, "ulysses": cp.ulysses_attention}[name]


def _median_ms(fn, args, world: int) -> float:
    """The slowest rank's median over args.iters CUDA-event timings of fn()."""
    for _ in range(args.warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.iters):
        if world > 1:
            dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    ms = torch.tensor([statistics.median(times)], device="cuda")
    if world > 1:
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return ms.item()


def _pass_fn(pass_: str, attend, q, k, v, dout):
    if pass_ == "fwd":
        return lambda: attend(q, k, v)

    def fwd_bwd():
        for t in (q, k, v):
            t.grad = None
        attend(q, k, v).backward(dout)
    return fwd_bwd


def _draw(args, length: int, heads: int, generator) -> torch.Tensor:
    return torch.randn(args.batch, heads, length, args.headdim, device="cuda", dtype=args.dtype, generator=generator)


def _check(args, name: str, world: int, length: int) -> float:
    """max |unshard(scheme) - one-GPU attention| / max(1, max |one GPU|) on the whole sequence."""
    from attn_kernels import distributed as cp, fused_attention

    gen = torch.Generator(device="cuda").manual_seed(0)  # the same inputs on every rank
    n = length * world
    q, k, v = _draw(args, n, args.heads, gen), _draw(args, n, args.kv_heads, gen), _draw(args, n, args.kv_heads, gen)
    whole = fused_attention(q, k, v, is_causal=args.causal, enable_gqa=True).float()
    shard = lambda t: cp.shard_sequence(t, 2, layout=args.layout)  # noqa: E731
    out = _scheme_fn(name)(shard(q), shard(k), shard(v), is_causal=args.causal, enable_gqa=True,
                           layout=args.layout)
    got = cp.unshard_sequence(out, 2, layout=args.layout).float()
    return ((got - whole).abs().max() / whole.abs().max().clamp_min(1.0)).item()


def _comm_ms(args, name: str, world: int, q, k, v) -> float:
    """The scheme's forward communication alone (the same calls, no attention)."""
    from attn_kernels.distributed import _comm

    group = dist.group.WORLD
    rank = dist.get_rank()
    if name == "ring":
        def run():
            kv = (k, v)
            for _ in range(world - 1):
                kv, works = _comm.ring_exchange(kv, group, rank, world)
                _comm.wait(works)
    elif name == "allgather":
        def run():
            _comm.all_gather(k, group, world)
            _comm.all_gather(v, group, world)
    else:
        def run():
            for t in (q, k, v, q):  # q, k, v in, the output (shaped like q here) back
                _comm.all_to_all(t.reshape(world, -1), group)
    return _median_ms(run, args, world)


def _ring_compute_ms(args, world: int, q, k, v) -> float:
    """The ring's forward block calls alone, on the local K/V standing in for every shard."""
    from attn_kernels import fused_attention
    from attn_kernels.distributed._args import Call
    from attn_kernels.distributed.ring import ring_blocks

    rank = dist.get_rank()
    call = Call("bench", dist.group.WORLD, rank, world, args.layout, args.causal, args.headdim ** -0.5, True,
                (-1, -1), 0.0, "auto", False)

    def run():
        for step in range(world):
            for rows, cols, causal in ring_blocks(call, (rank - step) % world, q.shape[2], k.shape[2]):
                fused_attention(q[:, :, rows], k[:, :, cols], v[:, :, cols], is_causal=causal, enable_gqa=True,
                                return_lse=True)
    return _median_ms(run, args, world)


def run_length(args, world: int, length: int) -> list:
    """Records for one per-GPU length: the one-GPU baseline, then each scheme and pass."""
    from attn_kernels import fused_attention

    gen = torch.Generator(device="cuda").manual_seed(1 + dist.get_rank())
    q, k, v = (_draw(args, length, h, gen).requires_grad_() for h in (args.heads, args.kv_heads, args.kv_heads))
    dout = torch.randn_like(q)
    n = length * world
    records = []
    errors = {name: _check(args, name, world, min(length, 2048)) for name in args.schemes
              if not (name == "ulysses" and (args.heads % world or args.kv_heads % world))}
    for pass_ in PASSES:
        single = _median_ms(_pass_fn(pass_, lambda a, b, c: fused_attention(a, b, c, is_causal=args.causal,
                                                                               enable_gqa=True), q, k, v, dout),
                            args, 1)
        single_tflops = tflops(attention_flops(args.batch, args.heads, length, length, args.headdim, args.causal,
                                               pass_), single)
        for name in args.schemes:
            base = dict(scheme=name, layout=args.layout, world=world, pass_=pass_, seqlen_per_gpu=length,
                        seqlen=n, single_gpu_ms=single, single_gpu_tflops=single_tflops)
            if name == "ulysses" and (args.heads % world or args.kv_heads % world):
                records.append(dict(base, status="skipped", note=f"heads not divisible by W={world}"))
                continue
            err = errors[name]
            if err > CHECK_TOLERANCE:
                records.append(dict(base, status="wrong", check_err=err))
                continue
            fn = _scheme_fn(name)
            attend = lambda a, b, c, fn=fn: fn(a, b, c, is_causal=args.causal, enable_gqa=True,  # noqa: E731
                                               layout=args.layout)
            ms = _median_ms(_pass_fn(pass_, attend, q, k, v, dout), args, world)
            per_gpu = tflops(attention_flops(args.batch, args.heads, n, n, args.headdim, args.causal, pass_) / world,
                             ms)
            record = dict(base, status="ok", check_err=err, ms=ms, tflops_per_gpu=per_gpu,
                          ratio=per_gpu / single_tflops if single_tflops else None,
                          overhead=ms / single - 1 if world == 1 else None)
            if world > 1 and pass_ == "fwd":
                comm = _comm_ms(args, name, world, q.detach(), k.detach(), v.detach())
                record["comm_ms"] = comm
                if name == "ring":
                    compute = _ring_compute_ms(args, world, q.detach(), k.detach(), v.detach())
                    record.update(compute_ms=compute, hidden=max(0.0, comm + compute - ms) / comm if comm else None)
            records.append(record)
    return records


def markdown(records: list, machine: dict) -> str:
    cols = ["scheme", "pass_", "world", "seqlen", "seqlen_per_gpu", "ms", "tflops_per_gpu", "single_gpu_tflops",
            "ratio", "overhead", "comm_ms", "hidden", "status"]
    fmt = lambda x: f"{x:.3g}" if isinstance(x, float) else ("" if x is None else str(x))  # noqa: E731
    lines = [f"# Context parallelism on {machine['gpu']} (torch {machine['torch']}, triton {machine['triton']}, "
             f"{machine['date']})", "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in records]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    reason = refusal(world, gpus)
    if reason:
        print(reason, file=sys.stderr)
        return 2
    if world == 1 and gpus > 1:
        print(f"one process: W = 1, the wrappers' overhead; for W = {gpus}: "
              f"torchrun --nproc-per-node {gpus} bench/bench_context_parallel.py", file=sys.stderr)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python`: a one-process group for the W = 1 run
            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
        dist.init_process_group("nccl", timeout=timedelta(minutes=10), device_id=torch.device("cuda", local_rank))
    try:
        records = [r for length in args.seqlens for r in run_length(args, world, length)]
    finally:
        dist.barrier()
        dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        machine = machine_info("cuda")
        records = [dict(machine, **r) for r in records]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{file_stem(machine['gpu'])}-cp-w{world}"
        (out / f"{stem}.json").write_text(json.dumps(records, indent=1) + "\n")
        (out / f"{stem}.md").write_text(markdown(records, machine))
        print(markdown(records, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
