"""Decoding benchmark: one new token against a long KV cache, as achieved bandwidth.

    python bench/bench_decode.py            # GPU: B 1/8/64 x cache 1k..128k, bf16; no GPU: a tiny CPU run
    python bench/bench_decode.py --quick

Lq = 1, Hq = 32, Hkv = 8, D = 128 (Llama-style GQA). Bandwidth = bytes of K and V read
(2 * B * S * Hkv * D * itemsize) / median time, next to the device-to-device copy
bandwidth measured in the same run (read + write of a 1 GiB buffer), the roof a
memory-bound decode kernel can approach. Implementations: attn_kernels with a
contiguous and a paged (block 256) cache, SDPA (enable_gqa, whichever backend it
picks) and compiled FlexAttention. Each is checked against fp32 math at the first
cache length of every batch before it is timed. Writes bench/results/<gpu>-decode.json / .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from measure import cpu_timer, cuda_timer, free_memory, is_oom
from records import file_stem, machine_info, write_json

RESULTS_DIR = Path(__file__).resolve().parent / "results"
HQ, HKV, D, BLOCK = 32, 8, 128, 256
DEFAULTS = {
    ("cuda", False): dict(batches=[1, 8, 64], cache_lens=[1024, 4096, 16384, 65536, 131072], dtype=torch.bfloat16),
    ("cuda", True): dict(batches=[1, 8], cache_lens=[4096, 16384], dtype=torch.bfloat16),
    ("cpu", False): dict(batches=[1, 2], cache_lens=[256, 1024], dtype=torch.float32),
    ("cpu", True): dict(batches=[1], cache_lens=[256], dtype=torch.float32),
}
MEMORY_SHARE = 0.4  # skip caches above this share of GPU memory (room for SDPA / checks)


def kv_bytes(batch: int, cache_len: int, dtype: torch.dtype, heads_kv: int = HKV, dim: int = D) -> int:
    """Bytes a decode step must read: every cached key and value once."""
    return 2 * batch * cache_len * heads_kv * dim * torch.finfo(dtype).bits // 8


def copy_bandwidth(device: str, timer, size_bytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written per second)."""
    src = torch.empty(size_bytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * size_bytes / (ms * 1e-3) / 1e9


def implementations(device: str) -> dict:
    """name -> prepare(q (B, 1, Hq, D), k, v (B, S, Hkv, D)) -> a no-argument call."""
    import attn_kernels

    def ours(q, k, v):
        seqlens = torch.full((q.shape[0],), k.shape[1], dtype=torch.int32, device=q.device)
        return lambda: attn_kernels.fused_attention_with_kvcache(q, k, v, seqlens)

    def ours_paged(q, k, v):
        B, S = k.shape[:2]
        table = torch.arange(B * S // BLOCK, dtype=torch.int32, device=q.device).view(B, -1)
        pk, pv = (t.reshape(B * S // BLOCK, BLOCK, *t.shape[2:]) for t in (k, v))
        seqlens = torch.full((B,), S, dtype=torch.int32, device=q.device)
        return lambda: attn_kernels.fused_attention_with_kvcache(q, pk, pv, seqlens, block_table=table)

    def sdpa(q, k, v):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

    impls = {"attn_kernels": ours, "attn_kernels.paged": ours_paged, "sdpa": sdpa}
    if device == "cuda":
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)

        def flex_decode(q, k, v):
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            return lambda: flex(qt, kt, vt, enable_gqa=True)

        impls["flex"] = flex_decode
    return impls


def output_of(result) -> torch.Tensor:
    """(B, 1, Hq, D) whatever the implementation's layout."""
    return result if result.shape[1] == 1 and result.shape[2] == HQ else result.transpose(1, 2)


def run(device: str, batches, cache_lens, dtype, names, timer) -> list:
    machine = machine_info(device)
    copy_gbps = copy_bandwidth(device, timer, 1 << 30 if device == "cuda" else 1 << 26)
    print(f"{machine['gpu']}: device-to-device copy {copy_gbps:.0f} GB/s")
    impls = {name: prep for name, prep in implementations(device).items() if name in names}
    records = []
    for batch in batches:
        verified = {}
        for cache_len in cache_lens:
            base = dict(machine, batch=batch, heads_q=HQ, heads_kv=HKV, headdim=D, cache_len=cache_len,
                        dtype=str(dtype).removeprefix("torch."), bytes=kv_bytes(batch, cache_len, dtype),
                        copy_gbps=copy_gbps)
            if device == "cuda" and 3 * base["bytes"] > MEMORY_SHARE * torch.cuda.get_device_properties(0).total_memory:
                records += [dict(base, impl=n, status="skipped", note="cache too large for this GPU") for n in impls]
                continue
            q = torch.randn(batch, 1, HQ, D, device=device, dtype=dtype)
            k = torch.randn(batch, cache_len, HKV, D, device=device, dtype=dtype)
            v = torch.randn(batch, cache_len, HKV, D, device=device, dtype=dtype)
            expected = None
            for name, prepare in impls.items():
                record = dict(base, impl=name, status="ok", note=None, ms=None, gbps=None, fraction_of_copy=None)
                try:
                    fn = prepare(q, k, v)
                    if name not in verified:  # correctness before speed, once per batch size
                        if expected is None:
                            expected = F.scaled_dot_product_attention(
                                *(t.float().transpose(1, 2) for t in (q, k, v)), enable_gqa=True).transpose(1, 2)
                        err = (output_of(fn()).float() - expected).abs().max().item()
                        verified[name] = err < (2e-2 if dtype != torch.float32 else 1e-4)
                        if not verified[name]:
                            record.update(status="wrong", note=f"max error {err:.3g}")
                    if verified[name]:
                        ms = timer(fn)
                        gbps = base["bytes"] / (ms * 1e-3) / 1e9
                        record.update(ms=ms, gbps=gbps, fraction_of_copy=gbps / copy_gbps)
                except Exception as exc:  # noqa: BLE001
                    record.update(status="oom" if is_oom(exc) else "error", note=str(exc).splitlines()[0][:200])
                records.append(record)
            del q, k, v, expected
            free_memory()
    return records


def render_markdown(records: list) -> str:
    first = records[0]
    lines = [f"# Decode bandwidth on {first['gpu']}", "",
             f"torch {first['torch']}, triton {first['triton']}, CUDA {first['cuda']}, {first['date']}; "
             f"Lq=1, Hq={HQ}, Hkv={HKV}, D={D}, {first['dtype']}; copy bandwidth {first['copy_gbps']:.0f} GB/s", "",
             "| batch | cache | impl | ms | GB/s | of copy | status |", "|---|---|---|---|---|---|---|"]
    for r in records:
        ms = f"{r['ms']:.4f}" if r.get("ms") else "-"
        gbps = f"{r['gbps']:.1f}" if r.get("gbps") else "-"
        frac = f"{100 * r['fraction_of_copy']:.0f}%" if r.get("fraction_of_copy") else "-"
        lines.append(f"| {r['batch']} | {r['cache_len']} | {r['impl']} | {ms} | {gbps} | {frac} | {r['status']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--cache-lens", type=int, nargs="+")
    parser.add_argument("--impls", default="attn_kernels,attn_kernels.paged,sdpa,flex")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    defaults = DEFAULTS[(args.device, args.quick)]
    timer = cuda_timer(25, 100) if args.device == "cuda" else cpu_timer(100)
    if args.device == "cpu":
        print("CPU run: eager paths on the CPU, for a smoke test; these are not kernel timings")
    records = run(args.device, args.batches or defaults["batches"], args.cache_lens or defaults["cache_lens"],
                  defaults["dtype"], args.impls.split(","), timer)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{file_stem(records[0]['gpu'])}-decode{'-quick' if args.quick else ''}"
    write_json(records, args.out / f"{stem}.json")
    table = render_markdown(records)
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    return 0 if all(r["status"] in ("ok", "skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
