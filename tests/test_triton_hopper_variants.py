"""The Hopper variants of issue #15 (attn_kernels/triton/variants.py): "tma" (F3, tensor
descriptors for the forward's Q/K/V loads and O store) and "ws" (F4, the same with the
non-causal key loop warp-specialised, refused below sm_100).

Under the interpreter: the variant really reads through descriptors where strides allow
(contiguous and (N, H, D)-major inputs, ragged last tiles, several batches and heads, so a
tile that crossed into the next head would be caught), keeps the pointer path with the
reason recorded where they do not (head dims whose rows are not 16-byte multiples,
broadcast strides, unaligned bases, packed batches), and matches the float64 reference
either way. Compiled for sm_90 (no GPU: bench/kernel_resources.py's stand-in driver): the
TMA copies are in the TTGIR, so the variant is not silently a pointer path; "ws" raises
NotImplementedError for sm_90 (where the installed Triton leaves the loop unspecialised:
checked here, so a Triton that starts applying it there fails this test and lifts the
refusal), and for sm_100 its non-causal loop is a `ttg.warp_specialize` op. The
accuracy suite of tests/test_triton_variants.py runs every variant, these included."""

import json
import os
import subprocess
import sys

import pytest
import torch
from accuracy import check_against_reference
from conftest import DEVICE
from test_attention_fwd import BF16, FP16, FP32, fused, make_qkv
from test_attention_varlen import check_varlen, packed_inputs

from attn_kernels.triton import attention_fwd, variants


@pytest.fixture
def descriptors_made(monkeypatch):
    """Count the tensor descriptors the forward builds: -> list of block shapes."""
    made = []
    original = attention_fwd.TensorDescriptor.from_tensor

    def counting(tensor, block_shape, *args, **kwargs):
        made.append(list(block_shape))
        return original(tensor, block_shape, *args, **kwargs)

    monkeypatch.setattr(attention_fwd.TensorDescriptor, "from_tensor", staticmethod(counting))
    return made


def _nhd_major(t):
    """(Z, H, N, D) values laid out as (Z, N, H, D) in memory, as a model's projections give them."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("layout", ["contiguous", "nhd"])
@pytest.mark.parametrize("L,S,E,Ev,dtype,kwargs", [
    (129, 100, 40, 24, FP16, dict(enable_gqa=True)),  # ragged query and key tiles, E != Ev, not powers of 2
    (100, 129, 64, 64, BF16, dict(is_causal=True)),
    (17, 70, 16, 16, FP16, dict(window_size=(5, 9), enable_gqa=True)),
])
def test_tma_reads_through_descriptors(monkeypatch, descriptors_made, layout, L, S, E, Ev, dtype, kwargs):
    monkeypatch.setenv(variants.ENV, "tma")
    hkv = 2 if kwargs.get("enable_gqa") else 4
    q, k, v = make_qkv((2,), 4, hkv, L, S, E, Ev, dtype)
    if layout == "nhd":
        q, k, v = (_nhd_major(t) for t in (q, k, v))
    check_against_reference(fused, q, k, v, return_lse=True, **kwargs)
    assert variants.last_choices()["fwd"] == ("tma", f"forced by {variants.ENV}")
    # the backward runs the baseline kernels, and says so
    assert all(variants.last_choices()[kind].name == "baseline" and "only the forward" in
               variants.last_choices()[kind].reason for kind in ("dkdv", "dq"))
    # q, k, v, out: one (1, 1, rows, padded D) box each, per forward launch
    assert len(descriptors_made) >= 4 and len(descriptors_made) % 4 == 0
    assert all(b[:2] == [1, 1] and b[3] >= max(16, E if i % 4 < 2 else Ev)
               for i, b in enumerate(descriptors_made))


def _misaligned(t):
    """The same values at a base address that is 2 bytes off a 16-byte boundary."""
    flat = torch.empty(t.numel() + 8, device=t.device, dtype=t.dtype)
    out = flat[1:1 + t.numel()].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.parametrize("case,reason", [
    ("float32", "float32 inputs"),
    ("head dim 17", "not all non-zero multiples of 16 bytes"),
    ("broadcast k", "not all non-zero multiples of 16 bytes"),
    ("misaligned q", "q: base not 16-byte aligned"),
])
def test_tma_keeps_the_pointer_path_with_a_reason(monkeypatch, descriptors_made, case, reason):
    monkeypatch.setenv(variants.ENV, "tma")
    E = 17 if case == "head dim 17" else 32
    q, k, v = make_qkv((2,), 4, 4, 70, 90, E, 32, FP32 if case == "float32" else FP16)
    if case == "broadcast k":  # stride 0 over the batch
        k = k[:1].expand(2, -1, -1, -1)
    if case == "misaligned q":
        q = _misaligned(q)
        assert q.data_ptr() % 16
    check_against_reference(fused, q, k, v, grad=False)
    last = variants.last_choices()["fwd"]
    assert last.name == "baseline" and "'tma' asked, pointer loads" in last.reason and reason in last.reason, last
    assert descriptors_made == []


def test_tma_keeps_the_pointer_path_for_packed_batches(monkeypatch, descriptors_made):
    monkeypatch.setenv(variants.ENV, "tma")
    check_varlen(*packed_inputs([5, 130, 1, 64], [9, 100, 30, 70], 4, 2, 32, 24, BF16), is_causal=False)
    last = variants.last_choices()["fwd"]
    assert last.name == "baseline" and "varlen" in last.reason, last
    assert descriptors_made == []


def test_tma_eligibility_rules():
    t = torch.empty(2, 3, 40, 48, dtype=FP16)
    assert variants.descriptor_blocker(t) is None
    assert variants.descriptor_blocker(t.transpose(1, 2).contiguous().transpose(1, 2)) is None
    assert "last dim" in variants.descriptor_blocker(t.transpose(2, 3))
    assert variants.descriptor_blocker(t[..., :20]) is None  # a narrower slice keeps its 96 B rows
    assert "strides" in variants.descriptor_blocker(torch.empty(2, 3, 40, 12, dtype=FP16))  # 24 B rows


# ----------------------------------------------------------------------------------
# compiled for sm_90: the loads and the store are TMA copies

_COMPILE = r"""
import os, sys, torch
sys.path.insert(0, os.path.join(sys.argv[2], "bench"))
from kernel_resources import compiling_only
from attn_kernels.triton import launch, variants

if len(sys.argv) > 4:  # lift variant "ws"'s refusal, to see what Triton does with the loop there
    variants.WS_MIN_ARCH = int(sys.argv[4])
b16 = torch.bfloat16
q, k = torch.empty(2, 4, 256, 128, dtype=b16), torch.empty(2, 2, 256, 128, dtype=b16)
ran = []
with compiling_only(int(sys.argv[3])) as compiled:
    for band in ((None, None), (None, 0)):  # non-causal, causal
        launch.forward(q, k, k.clone(), launch.score_mods(q, 0.1, band=band))
        ran.append(variants.last_choices()["fwd"].name)
with open(os.path.join(sys.argv[1], "ran.txt"), "w") as f:
    f.write(" ".join(ran))
for i, (name, kernel) in enumerate(compiled):
    for ir in ("ttir", "ttgir"):
        with open(os.path.join(sys.argv[1], f"{i:02d}_{name}.{ir}"), "w") as f:
            f.write(kernel.asm[ir])
"""


def compile_forward(tmp_path, variant, arch=90, ws_min_arch=None):
    """Compile the bf16 D=128 forward (non-causal, causal) of `variant` for sm_<arch>:
    -> {file name: IR text}, "ran.txt" holding the variant each launch recorded; raises
    CalledProcessError with the child's stderr."""
    from test_int64_offsets import ROOT

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[variants.ENV] = variant
    extra = [] if ws_min_arch is None else [str(ws_min_arch)]
    subprocess.run([sys.executable, "-c", _COMPILE, str(tmp_path), ROOT, str(arch), *extra], env=env, cwd=ROOT,
                   check=True, capture_output=True, text=True, timeout=600)
    return {p.name: p.read_text() for p in sorted(tmp_path.iterdir())}


def test_tma_compiles_for_sm90_to_tma_copies(tmp_path):
    irs = compile_forward(tmp_path, "tma")
    assert irs.pop("ran.txt") == "tma tma"
    assert len(irs) == 4  # two forward kernels, ttir + ttgir each
    for name, ir in irs.items():
        if name.endswith(".ttir"):
            # every global load is a descriptor load (q, k, v), the O store a descriptor store; the LSE
            # store stays a pointer store
            assert "tt.load" not in ir and ir.count("tt.descriptor_load") == 3, name
            assert ir.count("tt.descriptor_store") == 1 and ir.count("tt.store") == 1, name
        else:
            assert "ttng.async_tma_copy_global_to_local" in ir and "ttng.async_tma_copy_local_to_global" in ir, name


# ----------------------------------------------------------------------------------
# "ws": warp specialisation of the non-causal forward loop

def test_ws_runs_where_it_applies_and_says_so_elsewhere(monkeypatch, descriptors_made):
    """Under the interpreter (which ignores warp_specialize: correctness of the variant's
    code path only): non-causal launches run "ws", causal ones its descriptors only,
    packed batches the baseline, each with the reason recorded. On a GPU below sm_100
    the call raises NotImplementedError instead."""
    monkeypatch.setenv(variants.ENV, "ws")
    q, k, v = make_qkv((2,), 4, 2, 129, 100, 40, 24, FP16)
    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] * 10 < variants.WS_MIN_ARCH:
        major, minor = torch.cuda.get_device_capability()
        with pytest.raises(NotImplementedError, match=f"'ws'.*on sm_{major}{minor}"):
            fused(q, k, v, enable_gqa=True)
        return
    check_against_reference(fused, q, k, v, return_lse=True, enable_gqa=True)
    assert variants.last_choices()["fwd"] == ("ws", f"forced by {variants.ENV}")
    assert variants.last_choices()["bwd"].name == "baseline"
    assert descriptors_made
    check_against_reference(fused, q, k, v, is_causal=True, enable_gqa=True)
    last = variants.last_choices()["fwd"]
    assert last.name == "tma" and "not warp-specialised" in last.reason, last
    check_varlen(*packed_inputs([5, 130, 1, 64], [9, 100, 30, 70], 4, 2, 32, 24, FP32), is_causal=False)
    last = variants.last_choices()["fwd"]
    assert last.name == "baseline" and "varlen" in last.reason and "no warp specialisation" in last.reason, last


@pytest.mark.parametrize("arch", [90, 80])
def test_ws_refuses_below_sm100(tmp_path, arch):
    with pytest.raises(subprocess.CalledProcessError) as failed:
        compile_forward(tmp_path, "ws", arch)
    assert "NotImplementedError: kernel variant 'ws'" in failed.value.stderr and f"on sm_{arch}" in failed.value.stderr


def test_ws_is_not_applied_on_sm90_by_this_triton(tmp_path):
    """Why "ws" refuses sm_90: with the refusal lifted, the loop is marked for warp
    specialisation in the TTIR, but the TTGIR for sm_90 has no warp_specialize op (the
    Hopper pass leaves it as it was). A Triton that applies it fails this test: then
    lower variants.WS_MIN_ARCH."""
    irs = compile_forward(tmp_path, "ws", 90, ws_min_arch=90)
    assert irs.pop("ran.txt") == "ws tma"
    assert "tt.warp_specialize" in irs["00_attn_fwd_kernel.ttir"]
    assert "ttg.warp_specialize" not in irs["00_attn_fwd_kernel.ttgir"]


def test_ws_compiles_for_sm100_warp_specialised(tmp_path):
    irs = compile_forward(tmp_path, "ws", 100)
    assert irs.pop("ran.txt") == "ws tma"  # non-causal warp-specialised, causal descriptors only
    assert "ttg.warp_specialize" in irs["00_attn_fwd_kernel.ttgir"]
    assert "ttng.async_tma_copy_global_to_local" in irs["00_attn_fwd_kernel.ttgir"]
    assert "ttg.warp_specialize" not in irs["01_attn_fwd_kernel.ttgir"]


# ----------------------------------------------------------------------------------
# the backward's first-guess tiles (launch_config.py) spill nothing on sm_90 for 16-bit inputs

_BACKWARD_SPILLS = r"""
import json, sys
sys.path.insert(0, "bench")
import kernel_resources as kr
rows = kr.survey(90, (64, 128), ("bfloat16",), passes=("bwd",), seqlen=1024, variant_names=("baseline",))
print(json.dumps([(r.case, r.kernel, r.registers, r.spill_bytes) for r in rows]))
"""


def test_baseline_backward_compiles_for_sm90_without_spills():
    from test_int64_offsets import ROOT

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", _BACKWARD_SPILLS], env=env, cwd=ROOT, check=True,
                          capture_output=True, text=True, timeout=600)
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(rows) == 12  # D 64 / 128 x causal or not x (preprocess, dK/dV, dQ)
    assert all(spills == 0 for *_, spills in rows), rows
