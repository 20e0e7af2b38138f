"""Kernel variants (attn_kernels/triton/variants.py): how a launch picks one, and every
registered variant, forced with ATTN_KERNELS_TRITON_VARIANT, against the float64
reference over a compact set of cases (odd lengths, GQA, masks, windows, ALiBi,
softcap, dropout, varlen, causal both alignments, fp32 / fp16 / bf16). Also checks
that the "interior" variant really runs mask-free tiles where it should, and none
where a modifier forbids them, and that "onepass" (dQ by atomics) runs its own
kernel, but never with deterministic=True."""

import inspect
import json

import pytest
import torch
from accuracy import check_against_reference
from conftest import DEVICE
from test_attention_fwd import BF16, FP16, FP32, fused, make_qkv
from test_attention_varlen import check_varlen, packed_inputs

from attn_kernels import dropout_keep_mask, fused_attention_varlen, reference
from attn_kernels.triton import attention_bwd, attention_bwd_onepass, attention_fwd, tuning, variants

ALL = variants.names()


@pytest.fixture
def variant(request, monkeypatch):
    if request.param == "ws" and DEVICE == "cuda" and torch.cuda.get_device_capability()[0] * 10 < variants.WS_MIN_ARCH:
        pytest.skip("variant 'ws' refuses GPUs below sm_100 (tests/test_triton_hopper_variants.py checks that)")
    monkeypatch.setenv(variants.ENV, request.param)
    return request.param


# ----------------------------------------------------------------------------------
# selection

def _key(kind="fwd"):
    return tuning.Key.of(kind, torch.float16, 128, False)


def test_registry_has_baseline_and_descriptions():
    assert ALL[0] == "baseline"
    assert all(isinstance(d, str) and d for d in variants.VARIANTS.values())


def test_default_is_baseline(monkeypatch):
    monkeypatch.delenv(variants.ENV, raising=False)
    assert variants.select(_key(), torch.device("cpu")) == ("baseline", "default (no forced variant, no table entry)")
    monkeypatch.setenv(variants.ENV, "auto")
    assert variants.select(_key(), torch.device("cpu")).name == "baseline"


def test_env_forces_and_unknown_name_lists_the_names(monkeypatch):
    monkeypatch.setenv(variants.ENV, "interior")
    assert variants.select(_key(), torch.device("cpu")) == ("interior", f"forced by {variants.ENV}")
    monkeypatch.setenv(variants.ENV, "warp-magic")
    with pytest.raises(ValueError, match="warp-magic.*baseline, interior"):
        variants.select(_key(), torch.device("cpu"))


def _table(tmp_path, monkeypatch, entries):
    monkeypatch.setattr(tuning, "TABLE_DIR", tmp_path)
    monkeypatch.setattr(tuning, "gpu_of", lambda device: "fake-gpu")
    (tmp_path / "fake-gpu.json").write_text(json.dumps({"configs": entries}))


def test_table_entry_selects_and_env_overrides_it(tmp_path, monkeypatch):
    monkeypatch.delenv(variants.ENV, raising=False)
    blocks = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    _table(tmp_path, monkeypatch, {_key().name(): dict(blocks, variant="interior"), _key("dq").name(): blocks})
    got = variants.select(_key(), torch.device("cpu"))
    assert got.name == "interior" and "fake-gpu.json" in got.reason and _key().name() in got.reason
    assert variants.select(_key("dq"), torch.device("cpu")).name == "baseline"  # entry without a variant
    monkeypatch.setenv(variants.ENV, "baseline")
    assert variants.select(_key(), torch.device("cpu")).name == "baseline"


def test_table_with_unknown_variant_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(variants.ENV, raising=False)
    _table(tmp_path, monkeypatch, {_key().name(): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3,
                                                       variant="gone")})
    with pytest.raises(ValueError, match="'gone'.*baseline"):
        variants.select(_key(), torch.device("cpu"))


def test_table_is_read_once_until_written(tmp_path, monkeypatch):
    # a launch reads the table's variant from tuning's per-process cache, not the file each time
    monkeypatch.delenv(variants.ENV, raising=False)
    monkeypatch.setattr(tuning, "_files", {})
    blocks = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    _table(tmp_path, monkeypatch, {_key().name(): dict(blocks, variant="interior")})
    assert variants.select(_key(), torch.device("cpu")).name == "interior"
    (tmp_path / "fake-gpu.json").write_text(json.dumps({"configs": {_key().name(): dict(blocks, variant="wide")}}))
    assert variants.select(_key(), torch.device("cpu")).name == "interior"
    tuning.forget(tmp_path / "fake-gpu.json")  # what a writer in this process does
    assert variants.select(_key(), torch.device("cpu")).name == "wide"


def test_forward_selects_once_per_launch(monkeypatch):
    calls = []
    real = variants.select
    monkeypatch.setattr(variants, "select", lambda *a: calls.append(a[0].kind) or real(*a))
    monkeypatch.setenv(variants.ENV, "tma")
    q, k, v = make_qkv((1,), 2, 2, 17, 17, 16, 16, FP16)
    fused(q, k, v)
    assert calls == ["fwd"] and variants.last_choices()["fwd"].name == "tma"


def test_interior_falls_back_with_a_reason_under_modifiers():
    asked = variants.Choice("interior", "forced")
    assert variants.interior_split("fwd", asked, dict(MASK_KIND=0, BAND_HI=True, DROPOUT=True, VARLEN=True))
    for flags, word in ((dict(MASK_KIND=1), "attn_mask"), (dict(HAS_ALIBI=True), "HAS_ALIBI"),
                        (dict(SOFTCAP=True), "SOFTCAP")):
        assert not variants.interior_split("fwd", asked, flags)
        last = variants.last_choices()["fwd"]
        assert last.name == "baseline" and word in last.reason


# ----------------------------------------------------------------------------------
# the interior variant runs mask-free tiles (and none where it must not)

def _count_tiles(monkeypatch):
    """Wrap the kernels' tile-loop helpers: -> {helper: [(EDGE, number of tiles)]}."""
    seen = {}
    for module, name, block in ((attention_fwd, "_fwd_tiles", "BLOCK_N"), (attention_bwd, "_dkdv_tiles", "BLOCK_M"),
                                (attention_bwd, "_dq_tiles", "BLOCK_N")):
        original = getattr(module, name)
        params = list(inspect.signature(original.fn).parameters)
        edge_at, block_at = params.index("EDGE"), params.index(block)

        # (start, stop) follow the loop-carried values: (acc, l_i, m_i), (dk, dv) or (dq,)
        first = params.index("start")

        def wrapper(*args, _original=original, _name=name, _edge=edge_at, _block=block_at, _first=first):
            start, stop = int(args[_first]), int(args[_first + 1])
            step = int(args[_block])
            tiles = len(range(start, stop, step)) if stop > start else 0
            seen.setdefault(_name, []).append((bool(args[_edge]), tiles))
            return _original(*args)

        monkeypatch.setattr(module, name, wrapper)
    return seen


@pytest.mark.parametrize("causal", [False, True])
def test_interior_variant_visits_mask_free_tiles(causal, monkeypatch):
    monkeypatch.setenv(variants.ENV, "interior")
    seen = _count_tiles(monkeypatch)
    q, k, v = make_qkv((1,), 2, 1, 200, 170, 16, 16, FP32)
    ins = [t.requires_grad_() for t in (q, k, v)]
    fused(*ins, is_causal=causal, enable_gqa=True).sum().backward()
    for name in ("_fwd_tiles", "_dkdv_tiles", "_dq_tiles"):
        interior = sum(n for edge, n in seen[name] if not edge)
        edge = sum(n for edge, n in seen[name] if edge)
        assert interior > 0 and edge > 0, (name, seen[name])


def test_interior_variant_keeps_the_edge_path_with_a_mask(monkeypatch):
    monkeypatch.setenv(variants.ENV, "interior")
    seen = _count_tiles(monkeypatch)
    q, k, v = make_qkv((1,), 2, 2, 130, 130, 16, 16, FP32)
    mask = torch.rand(130, 130, device=DEVICE) > 0.2
    ins = [t.requires_grad_() for t in (q, k, v)]
    fused(*ins, attn_mask=mask).sum().backward()
    assert seen and all(edge for calls in seen.values() for edge, _ in calls)


def test_wide_variant_launches_its_tiles_for_16bit_only(monkeypatch):
    key16 = tuning.Key.of("fwd", torch.float16, 64, False)
    wide = variants.Choice("wide", "forced")
    assert variants.tiles(wide, key16) == tuning.Blocks(128, 128, 8, 2)
    assert variants.tiles(wide, tuning.Key.of("dkdv", torch.bfloat16, 64, True)) == tuning.Blocks(64, 128, 8, 2)
    assert variants.tiles(wide, tuning.Key.of("dq", torch.bfloat16, 128, True)) is None  # spills on sm_90
    assert variants.tiles(wide, tuning.Key.of("fwd", torch.float32, 64, False)) is None
    assert variants.tiles(wide, tuning.Key.of("fwd", torch.float16, 256, False)) is None
    assert variants.tiles(variants.Choice("interior", "forced"), key16) is None
    monkeypatch.setenv(variants.ENV, "wide")
    seen = _count_tiles(monkeypatch)
    q, k, v = make_qkv((1,), 1, 1, 150, 300, 64, 64, FP16)
    ins = [t.requires_grad_() for t in (q, k, v)]
    fused(*ins).sum().backward()
    # baseline code (edge tiles only) over 128-key tiles: 300 keys are 3 tiles for each of 2 query blocks
    assert seen["_fwd_tiles"] == [(True, 3), (True, 3)]
    assert seen["_dq_tiles"] == [(True, 3)] * 3  # 150 queries in blocks of 64
    assert seen["_dkdv_tiles"] == [(True, 3)] * 3  # 3 key blocks of 128, each over 150 queries in 64s
    assert all(c.name == "wide" for c in variants.last_choices().values())


def test_baseline_visits_only_edge_tiles(monkeypatch):
    monkeypatch.setenv(variants.ENV, "baseline")
    seen = _count_tiles(monkeypatch)
    q, k, v = make_qkv((1,), 1, 1, 130, 130, 16, 16, FP32)
    fused(q, k, v)
    assert seen["_fwd_tiles"] and all(edge for edge, _ in seen["_fwd_tiles"])


# ----------------------------------------------------------------------------------
# the one-pass backward (dQ by atomics) runs when asked, and never with deterministic=True

def _count_backward_kernels(monkeypatch):
    """Wrap the tile loops of both backward paths: -> {helper: number of calls}."""
    seen = {}
    for module, name in ((attention_bwd, "_dkdv_tiles"), (attention_bwd, "_dq_tiles"),
                         (attention_bwd_onepass, "_onepass_tiles")):
        original = getattr(module, name)

        def wrapper(*args, _original=original, _name=name):
            seen[_name] = seen.get(_name, 0) + 1
            return _original(*args)

        monkeypatch.setattr(module, name, wrapper)
    return seen


def _grads(run, ins, dout):
    ins = [t.detach().clone().requires_grad_() for t in ins]
    return torch.autograd.grad(run(*ins), ins, dout)


def test_onepass_runs_one_kernel_with_atomic_dq(monkeypatch):
    monkeypatch.setenv(variants.ENV, "onepass")
    seen = _count_backward_kernels(monkeypatch)
    # non-contiguous (N, H, D)-major views, as a model's projections give them
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in make_qkv((1,), 4, 2, 70, 90, 16, 16, FP32))
    dout = torch.randn(1, 4, 70, 16, device=DEVICE)
    got = _grads(lambda *t: fused(*t, is_causal=True, enable_gqa=True), (q, k, v), dout)
    # dQ comes only from the one-pass kernel's atomic adds: the 3-kernel loops never ran
    assert seen.get("_onepass_tiles", 0) > 0 and "_dq_tiles" not in seen and "_dkdv_tiles" not in seen, seen
    assert variants.last_choices()["bwd"] == ("onepass", f"forced by {variants.ENV}")
    monkeypatch.setenv(variants.ENV, "baseline")
    want = _grads(lambda *t: fused(*t, is_causal=True, enable_gqa=True), (q, k, v), dout)
    assert variants.last_choices()["bwd"].name == "baseline"
    for a, b in zip(got, want):  # same math, another summation order
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_deterministic_never_runs_onepass_even_when_forced(monkeypatch):
    monkeypatch.setenv(variants.ENV, "onepass")
    seen = _count_backward_kernels(monkeypatch)
    q, k, v = make_qkv((1,), 4, 2, 70, 90, 16, 16, BF16)
    dout = torch.randn(1, 4, 70, 16, device=DEVICE, dtype=BF16)
    first, second = (_grads(lambda *t: fused(*t, enable_gqa=True, deterministic=True), (q, k, v), dout)
                     for _ in range(2))
    assert "_onepass_tiles" not in seen and seen.get("_dq_tiles", 0) > 0, seen
    last = variants.last_choices()["bwd"]
    assert last.name == "baseline" and "deterministic=True" in last.reason and "onepass" in last.reason
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # varlen: deterministic reaches the backward too
    seen.clear()
    packed = [t[0].transpose(0, 1).contiguous() for t in (q, k, v)]  # (N, H, D), one sequence
    cu_q, cu_k = (torch.tensor([0, n], device=DEVICE, dtype=torch.int32) for n in (70, 90))
    _grads(lambda *t: fused_attention_varlen(*t, cu_q, cu_k, 70, 90, deterministic=True, backend="triton"),
           packed, dout[0].transpose(0, 1))
    assert "_onepass_tiles" not in seen and variants.last_choices()["bwd"].name == "baseline", seen
    seen.clear()
    _grads(lambda *t: fused_attention_varlen(*t, cu_q, cu_k, 70, 90, backend="triton"), packed, dout[0].transpose(0, 1))
    assert seen.get("_onepass_tiles", 0) > 0 and variants.last_choices()["bwd"].name == "onepass", seen


def test_onepass_from_the_tile_table_yields_to_deterministic(tmp_path, monkeypatch):
    monkeypatch.delenv(variants.ENV, raising=False)
    key = _key("dkdv")
    _table(tmp_path, monkeypatch, {key.name(): dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2,
                                                    variant="onepass")})
    assert variants.onepass(key, torch.device("cpu"), deterministic=False)
    assert variants.last_choices()["bwd"].name == "onepass"
    assert not variants.onepass(key, torch.device("cpu"), deterministic=True)
    assert "deterministic=True" in variants.last_choices()["bwd"].reason
    # the forward (and a 3-kernel backward) under "onepass" run the baseline kernels, and say so
    assert variants.plan(_key(), torch.device("cpu"), {}) == (False, None)
    assert variants.last_choices()["fwd"].name == "baseline"
    assert variants.tiles(variants.Choice("onepass", "forced"), tuning.Key.of("dkdv", torch.bfloat16, 128, True)) \
        == tuning.Blocks(32, 128, 8, 2)  # no spills on sm_90 (bench/results/static/sm90-triton3.9-onepass.txt)


# ----------------------------------------------------------------------------------
# every variant against the reference

# (L, S, E, Ev, Hq, Hkv, dtype, kwargs): interior tiles, ragged edges and band edges in each
CASES = [
    (129, 100, 40, 24, 4, 2, FP16, dict(enable_gqa=True)),
    (200, 170, 16, 16, 2, 1, FP32, dict(is_causal=True, enable_gqa=True)),  # top-left causal
    (100, 129, 64, 64, 2, 2, BF16, dict(is_causal=True)),
    (150, 150, 16, 24, 2, 2, FP32, dict(window_size=(20, 33))),
    (65, 130, 32, 32, 2, 2, FP32, dict(scale=-0.2)),  # a negative scale (interior folds it into q)
    # one query row: fp32 (at fp16, dV = P^T dO of a single row sits at the rule's edge for some draws,
    # baseline included: the kernel rounds P to fp16 as FlashAttention does, accuracy.flash_style does not)
    (1, 17, 16, 16, 2, 2, FP32, {}),
    (129, 129, 16, 16, 2, 2, FP32, dict(softcap=3.0, is_causal=True)),
]


@pytest.mark.parametrize("variant", ALL, indirect=True)
@pytest.mark.parametrize("L,S,E,Ev,Hq,Hkv,dtype,kwargs", CASES)
def test_variant_matches_reference(variant, L, S, E, Ev, Hq, Hkv, dtype, kwargs):
    q, k, v = make_qkv((2,), Hq, Hkv, L, S, E, Ev, dtype)
    check_against_reference(fused, q, k, v, return_lse=True, **kwargs)


@pytest.mark.parametrize("variant", ALL, indirect=True)
def test_variant_bottom_right_causal_and_large_scores(variant):
    from torch.nn.attention.bias import causal_lower_right

    q, k, v = make_qkv((1,), 2, 2, 70, 200, 32, 32, FP16, magnitude=8.0)
    check_against_reference(fused, q, k, v, attn_mask=causal_lower_right(70, 200))


@pytest.mark.parametrize("variant", ALL, indirect=True)
def test_variant_masks_and_alibi_with_fully_masked_rows(variant):
    q, k, v = make_qkv((1,), 4, 2, 100, 90, 24, 24, FP32)
    mask = torch.rand(100, 90, device=DEVICE) > 0.3
    mask[7] = False  # a row with no allowed key
    check_against_reference(fused, q, k, v, attn_mask=mask, enable_gqa=True, return_lse=True)
    fmask = torch.randn(4, 100, 90, device=DEVICE).requires_grad_()
    slopes = torch.rand(4, device=DEVICE)
    check_against_reference(fused, q, k, v, attn_mask=fmask, alibi_slopes=slopes, enable_gqa=True)


@pytest.mark.parametrize("variant", ALL, indirect=True)
def test_variant_dropout_replays_the_keep_mask(variant):
    q, k, v = make_qkv((1,), 2, 1, 130, 150, 16, 16, FP32)
    dout = torch.randn(1, 2, 130, 16, device=DEVICE)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(11)
    out = fused(*ins, dropout_p=0.3, is_causal=True, enable_gqa=True)
    grads = torch.autograd.grad(out, ins, dout)
    torch.manual_seed(11)
    keep = dropout_keep_mask(q, k, 0.3, enable_gqa=True, backend="triton")
    ref_ins = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.attention(*ref_ins, dropout_p=0.3, is_causal=True, enable_gqa=True, dropout_mask=keep)
    ref_grads = torch.autograd.grad(ref, ref_ins, dout.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, atol=5e-5, rtol=0)


@pytest.mark.parametrize("variant", ALL, indirect=True)
@pytest.mark.parametrize("causal,dtype", [(True, FP32), (False, BF16)])
def test_variant_varlen(variant, causal, dtype):
    check_varlen(*packed_inputs([5, 130, 1, 64], [9, 100, 30, 70], 4, 2, 32, 24, dtype), is_causal=causal)


# ----------------------------------------------------------------------------------
# compiled for sm_90 (no GPU: bench/kernel_resources.py's stand-in driver)

_COMPILE_INTERIOR = r"""
import os, sys, torch
sys.path.insert(0, os.path.join(sys.argv[2], "bench"))
from kernel_resources import compiling_only
from attn_kernels.triton import launch

b16 = torch.bfloat16
q, k = torch.empty(2, 4, 256, 128, dtype=b16), torch.empty(2, 2, 256, 128, dtype=b16)
causal = launch.score_mods(q, 0.1, band=(None, 0))
with compiling_only(90) as compiled:
    launch.forward(q, k, k.clone(), causal)
    launch.backward(q.clone(), q, k, k.clone(), q.clone(), torch.empty(2, 4, 256), None, causal)
for i, (name, kernel) in enumerate(compiled):
    with open(os.path.join(sys.argv[1], f"{i:02d}_{name}.ttir"), "w") as f:
        f.write(kernel.asm["ttir"])
"""


def loop_bodies(ttir: str) -> list:
    """The text of every scf.for of a TTIR module, outermost first (nested loops repeat)."""
    lines, bodies = ttir.splitlines(), []
    for i, line in enumerate(lines):
        if "scf.for" in line and line.rstrip().endswith("{"):
            depth, body = 0, []
            for inner in lines[i:]:
                depth += inner.count("{") - inner.count("}")
                body.append(inner)
                if depth <= 0:
                    break
            bodies.append("\n".join(body))
    return bodies


def test_interior_loops_compile_for_sm90_without_mask_selects(tmp_path):
    import os
    import subprocess
    import sys

    from test_int64_offsets import ROOT, int32_stride_products

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[variants.ENV] = "interior"
    subprocess.run([sys.executable, "-c", _COMPILE_INTERIOR, str(tmp_path), ROOT], env=env, cwd=ROOT, check=True,
                   capture_output=True, text=True, timeout=600)
    irs = {p.name.split("_", 1)[1]: p.read_text() for p in tmp_path.iterdir()}
    for kernel in ("attn_fwd_kernel.ttir", "bwd_dkdv_kernel.ttir", "bwd_dq_kernel.ttir"):
        ir = irs[kernel]
        assert not int32_stride_products(ir), kernel
        inner = [b for b in loop_bodies(ir) if "scf.for" not in b.split("\n", 1)[1]]  # innermost loops
        selects = [b.count("arith.select") for b in inner]
        # edge, interior, edge: only the interior loop is free of selects (masks, -inf)
        assert len(inner) == 3 and selects[1] == 0 and selects[0] > 0 and selects[2] > 0, (kernel, selects)


def test_onepass_compiles_for_sm90_with_fp32_atomic_adds(tmp_path):
    """The one-pass kernel (bf16, D = 128, causal) compiles for sm_90; its query loop adds
    dQ with fp32 atomics, and the 3-kernel dK/dV and dQ kernels are not launched."""
    import os
    import subprocess
    import sys

    from test_int64_offsets import ROOT, int32_stride_products

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[variants.ENV] = "onepass"
    subprocess.run([sys.executable, "-c", _COMPILE_INTERIOR, str(tmp_path), ROOT], env=env, cwd=ROOT, check=True,
                   capture_output=True, text=True, timeout=600)
    irs = {p.name.split("_", 1)[1]: p.read_text() for p in tmp_path.iterdir()}
    assert sorted(irs) == ["attn_fwd_kernel.ttir", "bwd_onepass_kernel.ttir", "bwd_preprocess_kernel.ttir"]
    ir = irs["bwd_onepass_kernel.ttir"]
    assert not int32_stride_products(ir)
    inner = [b for b in loop_bodies(ir) if "scf.for" not in b.split("\n", 1)[1]]
    assert len(inner) == 1 and "tt.atomic_rmw fadd" in inner[0] and "f32" in inner[0].split("tt.atomic_rmw")[1]
    assert inner[0].count("= tt.dot ") == 5  # K Q^T, V dO^T, dV, dK, dQ (3-kernel path: dK/dV 4 + dQ 3 = 7)
