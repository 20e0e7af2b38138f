"""The CUDA C++ backend (attn_kernels.cuda -> attn_kernels._C -> csrc/).

Everywhere: status() and refusal() answer without raising; the extension, when it was
built, imports without a GPU and rejects bad arguments before touching CUDA; the ops'
schemas, fake implementations, autograd and torch.compile tracing (on meta tensors).
By default (needs g++ and the CUDA headers; ATTN_KERNELS_TEST_EMULATOR=0 skips it): the kernels
themselves run on CPU tensors through csrc/emulator, under two warp schedules, and meet
the accuracy rule; rows with one visible key are exact; offsets past 2^31 elements work;
and the emulator's checks catch mutated kernels (a removed barrier, a removed bounds
check).
On a GPU (@pytest.mark.gpu): the kernels against the float64 reference over odd sizes,
head dims, causal, GQA, strides and dtypes; bit-reproducible backward; opcheck;
torch.compile(fullgraph=True).
"""

import glob
import importlib
import importlib.util
import math
import mmap
import os
import platform
import shutil
from pathlib import Path

import pytest
import torch
from accuracy import check_against_reference
from conftest import HAS_CUDA

import attn_kernels
from attn_kernels import cuda as attn_cuda
from attn_kernels import reference
from attn_kernels._checks import check_attention
from torch.nn.attention.bias import causal_lower_right

FP16, BF16 = torch.float16, torch.bfloat16
ROOT = Path(__file__).resolve().parent.parent
HEAD_DIMS = attn_cuda.HEAD_DIMS
BUILT = bool(glob.glob(str(ROOT / "attn_kernels" / "_C*.so")))
CUDA_READY = HAS_CUDA and attn_cuda.status()[0]


def cuda_attention(query, key, value, is_causal=False, scale=None, enable_gqa=False, return_lse=False):
    """The backend with the reference's signature (4-D inputs), for check_against_reference."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    out, lse = attn_cuda.fused_attention(query, key, value, is_causal, scale)
    return (out, lse) if return_lse else out


def make_qkv(Z, Hq, Hkv, L, S, E, dtype, device="cuda", magnitude=1.0):
    q = torch.randn(Z, Hq, L, E, device=device, dtype=dtype) * magnitude
    k = torch.randn(Z, Hkv, S, E, device=device, dtype=dtype) * magnitude
    v = torch.randn(Z, Hkv, S, E, device=device, dtype=dtype)
    return q, k, v


def spec_for(E=64, Ev=None, L=17, S=33, dtype=FP16, Hq=4, Hkv=2, **kwargs):
    q = torch.randn(2, Hq, L, E, dtype=dtype)
    k = torch.randn(2, Hkv, S, E, dtype=dtype)
    v = torch.randn(2, Hkv, S, Ev or E, dtype=dtype)
    return check_attention(q, k, v, enable_gqa=Hq != Hkv, **kwargs)


# ----------------------------------------------------------------- any machine


def test_status_never_raises_and_says_why():
    ok, why = attn_cuda.status()
    assert isinstance(ok, bool) and isinstance(why, str) and why
    if not HAS_CUDA:
        assert not ok


def test_status_without_extension(monkeypatch):
    monkeypatch.setattr(attn_cuda, "_extension", lambda: (None, attn_cuda.NOT_BUILT))
    assert attn_cuda.status() == (False, attn_cuda.NOT_BUILT)
    err = attn_cuda.refusal(spec_for())
    assert type(err) is RuntimeError and "not built" in str(err)


def test_status_survives_a_failing_query(monkeypatch):
    def boom():
        raise OSError("broken install")

    monkeypatch.setattr(attn_cuda, "_extension", boom)
    ok, why = attn_cuda.status()
    assert not ok and "broken install" in why
    assert type(attn_cuda.refusal(spec_for())) is RuntimeError


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(attn_mask=torch.ones(17, 33, dtype=torch.bool)), "attn_mask"),
        (dict(dropout_p=0.1), "dropout"),
        (dict(window_size=(8, 0)), "window"),
        (dict(softcap=30.0), "softcap"),
        (dict(alibi_slopes=torch.ones(4)), "ALiBi"),
        (dict(attn_mask=causal_lower_right(17, 33)), "bottom-right"),
        (dict(dtype=torch.float32), "float32"),
        (dict(dtype=torch.float64), "float64"),
        (dict(E=80), "head dim 80"),
        (dict(E=512), "head dim 512"),
        (dict(E=64, Ev=32), "Ev=32"),
    ],
)
def test_refusal_names_the_missing_feature(kwargs, words):
    err = attn_cuda.refusal(spec_for(**kwargs))
    assert type(err) is NotImplementedError, err
    assert words in str(err)


@pytest.mark.parametrize("E", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_refusal_of_supported_calls_only_concerns_the_machine(E, dtype):
    # CPU tensors: unavailable here (RuntimeError) or, where it can run, not CUDA tensors (ValueError)
    err = attn_cuda.refusal(spec_for(E=E, dtype=dtype, is_causal=True))
    assert type(err) in (RuntimeError, ValueError), err


def test_bottom_right_causal_is_accepted_when_square():
    # with L == S both alignments are the same mask
    spec = spec_for(L=33, S=33, attn_mask=causal_lower_right(33, 33))
    assert spec.is_causal and spec.causal_bottom_right
    assert type(attn_cuda.refusal(spec)) in (RuntimeError, ValueError)


@pytest.mark.parametrize(
    "archs,capability,runs",
    [
        ("80+PTX;90a", (8, 0), True),
        ("80+PTX;90a", (8, 6), True),
        ("80+PTX;90a", (9, 0), True),
        ("80+PTX;90a", (12, 0), True),  # through the PTX
        ("80;90a", (12, 0), False),
        ("80;90a", (10, 0), False),
        ("86", (8, 0), False),
        ("90a", (8, 0), False),
        ("100", (10, 3), True),
        ("unknown", (9, 0), True),
    ],
)
def test_compiled_archs_vs_gpu(archs, capability, runs):
    assert attn_cuda._arch_runs_on(archs, capability) is runs


def load_setup_module():
    spec = importlib.util.spec_from_file_location("attn_kernels_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself only runs as __main__
    return module


def test_build_arch_list_parsing():
    setup = load_setup_module()
    assert setup.parse_archs("80+PTX;90a") == [("80", True), ("90a", False)]
    assert setup.parse_archs("8.0, 9.0a sm_86") == [("80", False), ("90a", False), ("86", False)]
    assert setup.gencode_flags([("80", True), ("90a", False)]) == [
        "-gencode=arch=compute_80,code=[sm_80,compute_80]",
        "-gencode=arch=compute_90a,code=sm_90a",
    ]
    for bad in ("75", "sm_70", "ampere", ""):
        with pytest.raises(ValueError):
            setup.parse_archs(bad)


def test_build_can_be_skipped(monkeypatch):
    setup = load_setup_module()
    monkeypatch.setenv("ATTN_KERNELS_SKIP_CUDA_BUILD", "1")
    assert setup.extensions() == []
    monkeypatch.delenv("ATTN_KERNELS_SKIP_CUDA_BUILD")
    monkeypatch.setattr(setup, "find_nvcc", lambda: None)
    assert setup.extensions() == []  # no nvcc: a pure-Python install


needs_extension = pytest.mark.skipif(not BUILT, reason="attn_kernels._C was not built here (no nvcc at install)")


@needs_extension
def test_extension_imports_without_libtorch_and_exposes_its_functions():
    ext = importlib.import_module("attn_kernels._C")
    for name in ("forward", "backward", "head_dims", "runtime_status"):
        assert callable(getattr(ext, name))
    assert tuple(ext.head_dims()) == HEAD_DIMS
    need = [ext.smem_bytes(E) for E in HEAD_DIMS]
    assert all(0 < n <= 227 * 1024 for n in need) and need == sorted(need) and ext.smem_bytes(80) == 0
    assert ext.FLOAT16 != ext.BFLOAT16
    assert isinstance(ext.ARCHS, str) and ext.CUDA_RUNTIME_VERSION >= 11000
    ok, count, message = ext.runtime_status()  # never raises, GPU or not
    assert isinstance(ok, bool) and (ok == (count > 0)) and (ok or message)


def forward_args(ext, **changes):
    aligned = (1 << 20, 8 * 64, 8 * 64, 64)  # a fake device pointer and strides of (Z, H, N, 64)
    args = dict(dtype=ext.FLOAT16, q=aligned, k=aligned, v=aligned, out=aligned, lse2=1 << 20,
                sizes=(1, 8, 8, 8, 8, 64), scale=0.125, causal=False, device=0, stream=0)
    args.update(changes)
    return args


@needs_extension
@pytest.mark.parametrize(
    "changes,words",
    [
        (dict(q=(0, 512, 512, 64)), "q is a null pointer"),
        (dict(k=((1 << 20) + 2, 512, 512, 64)), "16-byte aligned"),
        (dict(v=(1 << 20, 512, 512, 65)), "multiples of 8"),
        (dict(sizes=(1, 8, 8, 8, 8, 80)), "head dim 80"),
        (dict(sizes=(1, 8, 3, 8, 8, 64)), "multiple of heads_kv"),
        (dict(scale=math.inf), "scale"),
        (dict(dtype=7), "dtype"),
    ],
)
def test_extension_rejects_bad_arguments_before_any_launch(changes, words):
    ext = importlib.import_module("attn_kernels._C")
    with pytest.raises(ValueError, match=words):
        ext.forward(**forward_args(ext, **changes))


@needs_extension
@pytest.mark.skipif(HAS_CUDA, reason="checks the error of a machine without a CUDA device")
def test_extension_without_a_device_raises_a_clear_error():
    ext = importlib.import_module("attn_kernels._C")
    with pytest.raises(RuntimeError, match=r"attention_fwd<float16, 64>.*cuda"):
        ext.forward(**forward_args(ext))
    t = (1 << 20, 512, 512, 64)
    with pytest.raises(RuntimeError, match=r"attention_bwd<bfloat16, 64>"):
        ext.backward(ext.BFLOAT16, t, t, t, t, t, t, t, t, 1 << 20, 0, 1 << 20, (1, 8, 8, 8, 8, 64), 0.125, True, 0, 0)


def meta_qkv(Z=2, Hq=4, Hkv=2, L=17, S=33, E=64, dtype=FP16, grad=False):
    return [torch.empty(Z, H, N, E, dtype=dtype, device="meta", requires_grad=grad)
            for H, N in ((Hq, L), (Hkv, S), (Hkv, S))]


def test_ops_are_registered_with_fake_implementations():
    q, k, v = meta_qkv()
    out, lse, lse2 = torch.ops.attn_kernels.cuda_fwd(q, k, v, True, 0.125, False)
    assert out.shape == (2, 4, 17, 64) and out.dtype == FP16 and out.is_contiguous()
    assert lse.shape == lse2.shape == (2, 4, 17) and lse.dtype == lse2.dtype == torch.float32
    dq, dk, dv = torch.ops.attn_kernels.cuda_bwd(out, q, k, v, out, lse2, None, True, 0.125, False)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)


def test_ops_pass_opcheck_on_meta_tensors():
    q, k, v = meta_qkv(grad=True)
    torch.library.opcheck(torch.ops.attn_kernels.cuda_fwd.default, (q, k, v, True, 0.125, False))
    q, k, v = meta_qkv()
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device="meta")
    torch.library.opcheck(torch.ops.attn_kernels.cuda_bwd.default, (out, q, k, v, out, lse, lse, False, 0.125, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compile_traces_the_op_without_graph_break():
    def loss(q, k, v):
        out, lse = attn_cuda.fused_attention(q, k, v, True, 0.125)
        return out.float().sum() + lse.sum()

    q, k, v = meta_qkv(grad=True)
    torch.compile(loss, fullgraph=True, backend="aot_eager")(q, k, v).backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_gradient_of_both_lse_outputs_reaches_the_natural_log_lse():
    d, d2 = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    assert attn_cuda._natural_lse_grad(None, None) is None
    assert attn_cuda._natural_lse_grad(d, None) is d
    # lse2 = lse * log2(e): what autograd gives for a loss using lse and lse2
    lse = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    (want,) = torch.autograd.grad((lse * d).sum() + (lse * attn_cuda.LOG2E * d2).sum(), lse)
    torch.testing.assert_close(attn_cuda._natural_lse_grad(d, d2), want)
    torch.testing.assert_close(attn_cuda._natural_lse_grad(None, d2), d2 * attn_cuda.LOG2E)
    lse2 = torch.tensor([0.0, 1.0, -math.inf, -2.0])
    assert torch.equal(attn_cuda._natural_lse(lse2), torch.tensor([0.0, math.log(2), -math.inf, -2 * math.log(2)]))


def test_ops_check_their_inputs():
    q, k, v = meta_qkv(E=80)
    with pytest.raises(NotImplementedError):
        torch.ops.attn_kernels.cuda_fwd(q, k, v, False, 0.1, False)
    q, k, v = meta_qkv(dtype=torch.float32)
    with pytest.raises(TypeError):
        torch.ops.attn_kernels.cuda_fwd(q, k, v, False, 0.1, False)
    q, k, v = meta_qkv(Hq=3, Hkv=2)
    with pytest.raises(ValueError):
        torch.ops.attn_kernels.cuda_fwd(q, k, v, False, 0.1, False)


# ---------------------------------------------- the kernels on the CPU emulator


@pytest.fixture(scope="module")
def emulator_build():
    """csrc/emulator/build_emulator.py as a module (skips where the emulator cannot be built)."""
    # on by default (a g++ build of ~20 s, cached under build/); ATTN_KERNELS_TEST_EMULATOR=0 turns it off
    if os.environ.get("ATTN_KERNELS_TEST_EMULATOR", "1") == "0":
        pytest.skip("ATTN_KERNELS_TEST_EMULATOR=0: the CUDA kernels are not run on the CPU emulator")
    spec = importlib.util.spec_from_file_location("build_emulator", ROOT / "csrc" / "emulator" / "build_emulator.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    if build.missing() is not None:
        pytest.skip(f"cannot build the emulator here: {build.missing()}")
    return build


@pytest.fixture(scope="module")
def emulator(emulator_build):
    return emulator_build.load()


# warp schedules of the emulator (csrc/emulator/cuda_emulator.h): "ascending" lets one
# warp run ahead between block barriers, "staggered" also resumes the warps one at a time
# after each block barrier (and at the launch)
SCHEDULES = ("ascending", "staggered")


@pytest.fixture(params=SCHEDULES)
def schedule(request, monkeypatch):
    monkeypatch.setenv("ATTN_KERNELS_EMU_SCHEDULE", request.param)
    return request.param


class _Emulated(torch.autograd.Function):
    """The backend's forward / backward bodies with the emulator in place of _C, with the
    same lse handling as the cuda_fwd op: the natural-log lse out, the base-2 lse2 saved."""

    @staticmethod
    def forward(ctx, q, k, v, module, is_causal, scale):
        out, lse2 = attn_cuda._forward_impl(module, q, k, v, is_causal, scale)
        ctx.save_for_backward(q, k, v, out, lse2)
        ctx.args = (module, is_causal, scale)
        return out, attn_cuda._natural_lse(lse2)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse2 = ctx.saved_tensors
        module, is_causal, scale = ctx.args
        dq, dk, dv = attn_cuda._backward_impl(module, dout, q, k, v, out, lse2, dlse, is_causal, scale)
        return dq, dk, dv, None, None, None


def emulated(module):
    def attention(query, key, value, is_causal=False, scale=None, enable_gqa=False, return_lse=False):
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        out, lse = _Emulated.apply(query, key, value, module, is_causal, scale)
        return (out, lse) if return_lse else out

    return attention


# (Z, Hq, Hkv, L, S, E, causal, dtype): every head dim, edges of every tile size
EMULATED_CASES = [
    (1, 2, 1, 1, 17, 32, True, FP16),
    (2, 2, 2, 100, 129, 64, True, BF16),
    (1, 4, 2, 129, 100, 96, True, FP16),
    (1, 2, 2, 17, 1, 128, False, BF16),
    (1, 2, 1, 130, 65, 128, True, FP16),
    (1, 1, 1, 70, 33, 256, True, FP16),
    (1, 2, 1, 33, 70, 256, False, BF16),
    (1, 3, 3, 129, 129, 64, False, FP16),
]


@pytest.mark.parametrize("Z,Hq,Hkv,L,S,E,causal,dtype", EMULATED_CASES)
def test_emulated_kernels_match_reference(emulator, schedule, Z, Hq, Hkv, L, S, E, causal, dtype):
    q, k, v = make_qkv(Z, Hq, Hkv, L, S, E, dtype, device="cpu")
    check_against_reference(emulated(emulator), q, k, v, is_causal=causal, enable_gqa=Hq != Hkv, return_lse=True)


def test_emulated_kernels_take_strided_and_misaligned_inputs(emulator, schedule):
    B, H, L, S, E = 2, 2, 65, 47, 64
    q = torch.randn(B, L, H, E, dtype=BF16).transpose(1, 2)  # (B, S, H, D) memory
    k = torch.randn(B, S, H, E, dtype=BF16).transpose(1, 2)
    v = torch.randn(B * H * S * E + 1, dtype=BF16)[1:].view(B, H, S, E)  # not 16-byte aligned
    check_against_reference(emulated(emulator), q, k, v, is_causal=True, return_lse=True)


def test_emulated_large_scores_hold_the_accuracy_rule(emulator):
    # scale 1.0 and inputs ~N(0, 12): scores in the thousands
    q, k, v = (t * 12.0 for t in make_qkv(2, 4, 2, 65, 33, 64, FP16, device="cpu"))
    check_against_reference(emulated(emulator), q, k, v, is_causal=True, scale=1.0, enable_gqa=True,
                            return_lse=True)


def test_emulator_rejects_an_unknown_schedule(emulator, monkeypatch):
    monkeypatch.setenv("ATTN_KERNELS_EMU_SCHEDULE", "random")
    q, k, v = make_qkv(1, 1, 1, 17, 17, 32, FP16, device="cpu")
    with pytest.raises(RuntimeError, match="ATTN_KERNELS_EMU_SCHEDULE=random is not a schedule"):
        emulated(emulator)(q, k, v)


# ------------------------------------------- rows with one visible key are exact


def assert_rows_with_one_key_exact(attention, device, dtype):
    """S = 1 (issue #12's case: B=2, Hq=4, Hkv=1, L=64, E=96, causal, scale 1.0, inputs
    ~N(0, 12), scores in the thousands): every probability is exactly 1, so out == v,
    dv is the sum of dO over the group's rows to fp32 summation accuracy, and dq, dk are
    only the fp32 summation-order residue of dP - delta."""
    Z, Hq, Hkv, L, E = 2, 4, 1, 64, 96
    q, k, v = (torch.randn(shape, dtype=dtype, device=device) * 12.0
               for shape in ((Z, Hq, L, E), (Z, Hkv, 1, E), (Z, Hkv, 1, E)))
    dout = torch.randn(Z, Hq, L, E, dtype=dtype, device=device)
    ins = [t.requires_grad_() for t in (q, k, v)]
    out, lse = attention(*ins, is_causal=True, scale=1.0, enable_gqa=True, return_lse=True)
    dq, dk, dv = torch.autograd.grad(out, ins, dout)
    q, k, v, dout = (t.detach().double() for t in (q, k, v, dout))

    assert torch.equal(out.double(), v.expand(Z, Hq, L, E))
    # lse = the score (the row's one logit): an fp32 dot product of E exact products
    scores = (q @ k.transpose(-1, -2))[..., 0]  # (Z, Hq, L), float64
    dot_bound = (E + 2) * 2.0**-24 * (q.abs() @ k.abs().transpose(-1, -2))[..., 0]
    assert ((lse.double() - scores).abs() <= dot_bound).all()

    # dv: the float64 sum, up to fp32's recursive-summation bound and the output rounding
    rows = Hq * L
    exact = dout.sum(dim=(1, 2), keepdim=True)
    fp32_bound = rows * 2.0**-24 * dout.abs().sum(dim=(1, 2), keepdim=True)
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((dv.double() - exact).abs() <= 0.5 * ulp + fp32_bound).all()

    # dq, dk: dS = P (dP - delta) where dP and delta are two fp32 sums of the same E exact
    # products, so |dS| <= 2 E 2^-24 sum|dO v| per row; 5% covers the roundings after it
    residue = 2 * E * 2.0**-24 * (dout.abs() * v.abs()).sum(-1, keepdim=True)  # (Z, Hq, L, 1)
    assert (dq.double().abs() <= 1.05 * residue * k.abs()).all()
    dk_bound = 1.05 * (residue * q.abs()).sum(dim=(1, 2), keepdim=True)  # (Z, 1, 1, E)
    assert (dk.double().abs() <= dk_bound).all()
    assert dq.abs().max() > 0  # a residue, not a short cut


@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_emulated_rows_with_one_key_are_exact(emulator, dtype):
    assert_rows_with_one_key_exact(emulated(emulator), "cpu", dtype)


def assert_lone_key_p_is_one(attention, device, dtype, magnitude, scale):
    """A one-hot dO (row i -> column i) makes dV = P^T dO read out the backward's own
    probabilities: dv[..., j, i] == P[i, j] exactly (one nonzero product per sum). With
    S = 1, and on the first row of a causal sequence, that P must be exactly 1 at any
    score magnitude. (With the lse stored in natural log and converted back to base 2
    in the backward, the round trip misses the exponent by up to an ulp of the base-2
    score whenever scale * log2(e) is not a power of two times log2(e); from |scores|
    ~1e4 on, P then rounds to 1 +- 2^-10 in fp16, from ~1e5 on to 1 - 2^-8 in bf16.)"""
    E = 32

    def probe(Z, H, L, S, causal):
        dout = torch.zeros(Z, H, L, E, dtype=dtype, device=device)
        dout[..., torch.arange(L), torch.arange(L)] = 1.0
        q, k, v = (torch.randn(Z, H, n, E, dtype=dtype, device=device) * magnitude for n in (L, S, S))
        ins = [t.requires_grad_() for t in (q, k, v)]
        out = attention(*ins, is_causal=causal, scale=scale)
        return out.detach(), v.detach(), torch.autograd.grad(out, ins[2], dout)[0]

    Z, H, L = 2, 3, E  # S = 1: every one of the Z * H * L rows
    out, v, dv = probe(Z, H, L, 1, False)
    assert torch.equal(out, v.expand(Z, H, L, E))
    assert torch.equal(dv[..., 0, :L], torch.ones(Z, H, L, dtype=dtype, device=device)), "P of a lone key != 1"
    assert not dv[..., 0, L:].any()
    Z, H, L = 2, 16, 16  # causal, L = S: the first row of every (z, h)
    out, v, dv = probe(Z, H, L, L, True)
    assert torch.equal(out[..., 0, :], v[..., 0, :])
    assert torch.equal(dv[..., 0, 0], torch.ones(Z, H, dtype=dtype, device=device)), "P of a causal first row != 1"


# (dtype, input magnitude, scale): issue #12's scale 1.0 with inputs ~N(0, 12), and
# scores in the tens of thousands with a scale that is not a power of two
LONE_KEY_CASES = [(FP16, 12.0, 1.0), (BF16, 12.0, 1.0), (FP16, 64.0, 0.7), (BF16, 128.0, 0.7)]


@pytest.mark.parametrize("dtype,magnitude,scale", LONE_KEY_CASES)
def test_emulated_backward_recomputes_p_of_a_lone_key_as_one(emulator, dtype, magnitude, scale):
    assert_lone_key_p_is_one(emulated(emulator), "cpu", dtype, magnitude, scale)


# ---------------------------------------------------------- 64-bit offsets


# (Z, Hq, Hkv, L, E) and the strides of the views: each of the batch, head and row
# offsets passes 2^31 elements (the batch one 2^32)
FAR_SHAPE = (2, 2, 1, 17, 32)
FAR_ROW = (1 << 27) + (1 << 10)  # elements; row 16 is past 2^31
FAR_HEAD = FAR_SHAPE[3] * FAR_ROW
FAR_BATCH = FAR_SHAPE[1] * FAR_HEAD
FAR_SPAN = (FAR_SHAPE[0] - 1) * FAR_BATCH + (FAR_SHAPE[1] - 1) * FAR_HEAD + (FAR_SHAPE[3] - 1) * FAR_ROW + 4 * 32


def assert_far_offsets_work(attention, base):
    """q, k, v and dO as views of `base` (FAR_SPAN fp16 elements) whose batch, head and
    row strides put elements past 2^31 (and 2^32 bytes) from the start: the results must
    be bit-identical to those on contiguous copies, so every address product is 64-bit."""
    Z, Hq, Hkv, L, E = FAR_SHAPE
    assert min(FAR_HEAD, (L - 1) * FAR_ROW) > 2**31 and FAR_BATCH > 2**32

    def tensor(column, heads):  # (Z, heads, L, E) at `column` of every row slot
        return base.as_strided((Z, heads, L, E), (FAR_BATCH, FAR_HEAD, FAR_ROW, 1), column)

    q, k, v, dout = tensor(0, Hq), tensor(E, Hkv), tensor(2 * E, Hkv), tensor(3 * E, Hq)
    for t in (q, k, v, dout):
        t.copy_(torch.randn(t.shape, dtype=FP16))
    results = []
    for ins in ((q, k, v, dout), tuple(t.contiguous() for t in (q, k, v, dout))):
        q_, k_, v_ = (t.detach().requires_grad_() for t in ins[:3])
        out, lse = attention(q_, k_, v_, is_causal=True, enable_gqa=True, return_lse=True)
        results.append((out, lse, *torch.autograd.grad(out, (q_, k_, v_), ins[3])))
    for name, far, near in zip(("out", "lse", "dq", "dk", "dv"), *results):
        assert torch.equal(far, near), name
    ref = reference.attention(*(t.double() for t in (q, k, v)), is_causal=True, enable_gqa=True)
    assert (results[0][0].double() - ref).abs().max() < 1e-2


def sparse_buffer(nbytes):
    """An anonymous mapping of nbytes that reserves no memory (pages appear on first
    touch), as a 1-D uint8 tensor; None where that is not possible."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        return None
    noreserve = getattr(mmap, "MAP_NORESERVE", 0x4000)  # 0x4000 on x86-64 and arm64 Linux
    try:
        buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | noreserve)
    except (OSError, OverflowError, ValueError):
        return None
    return torch.frombuffer(buffer, dtype=torch.uint8)


def test_emulated_offsets_past_2_31_elements(emulator):
    # one sparse 18 GB mapping: only the touched rows (a few hundred pages) ever exist
    raw = sparse_buffer(2 * FAR_SPAN)
    if raw is None:
        pytest.skip("no sparse anonymous mapping on this platform")
    assert_far_offsets_work(emulated(emulator), raw.view(FP16))


# ------------------------------- the emulator's checks catch mutated kernels


@pytest.fixture(scope="module")
def mutant(emulator_build, tmp_path_factory):
    """mutant(path, anchor, replacement): the emulator built from a copy of csrc/ in which
    `anchor` (present exactly once in csrc/<path>) is replaced. Only the objects that
    include the file are recompiled."""

    def build(path, anchor, replacement):
        csrc = tmp_path_factory.mktemp("mutant") / "csrc"
        shutil.copytree(ROOT / "csrc", csrc, ignore=shutil.ignore_patterns("__pycache__"))
        text = (csrc / path).read_text()
        assert text.count(anchor) == 1, f"csrc/{path} no longer holds the mutation's anchor {anchor!r} once"
        (csrc / path).write_text(text.replace(anchor, replacement))
        return emulator_build.load_variant(csrc)

    return build


# the __syncthreads() that follows each cp.async.wait_group of a pipelined loop
MISSING_BARRIERS = [
    ("kernels/smem_tile.cuh", "  __syncthreads();  // tile j, copied by every thread, is visible to all\n"),
    ("kernels/attention_bwd_dkdv.cuh",
     "    __syncthreads();  // this stage's tiles, copied by every thread, are visible to all\n"),
]


@pytest.mark.parametrize("path,barrier", MISSING_BARRIERS, ids=["smem_tile-kv_pipeline", "dkdv-query_tiles"])
def test_staggered_schedule_catches_a_missing_barrier(emulator, mutant, monkeypatch, path, barrier):
    # several K/V tiles per query block (forward, dQ) and query tiles per key block (dK/dV)
    q, k, v = make_qkv(1, 2, 1, 100, 150, 64, FP16, device="cpu")
    monkeypatch.setenv("ATTN_KERNELS_EMU_SCHEDULE", "staggered")
    check_against_reference(emulated(emulator), q, k, v, is_causal=True, enable_gqa=True)  # intact: passes
    broken = mutant(path, barrier, "")
    with pytest.raises(RuntimeError, match=r"a cp\.async of thread \d+ has not landed yet"):
        check_against_reference(emulated(broken), q, k, v, is_causal=True, enable_gqa=True)


# (file, anchor, replacement, kernel that must fail): a bound check removed
MISSING_BOUNDS = [
    # K rows past S read by cp.async
    ("kernels/attention_fwd.cuh", "load_tile_async<BLOCK_N, D, Cfg::kThreads>(sK, k, p.k_str.row, 0, p.len_k, tid);",
     "load_tile_async<BLOCK_N, D, Cfg::kThreads>(sK, k, p.k_str.row, 0, BLOCK_N, tid);", "attention_fwd"),
    # lse2 stored for rows past L
    ("kernels/attention_fwd.cuh", "if (row_lo < p.len_q) st_global(lse2_row + row_lo, lse2[0]);",
     "st_global(lse2_row + row_lo, lse2[0]);", "attention_fwd"),
    # O and dO read (and delta stored) for the rows of a partial last block
    ("kernels/attention_bwd_delta.cuh", "  if (row >= rows) return;\n", "", "attention_bwd_delta"),
]


@pytest.mark.parametrize("path,anchor,replacement,kernel", MISSING_BOUNDS,
                         ids=["fwd-k_rows_past_S", "fwd-lse2_rows_past_L", "delta-rows_past_the_end"])
def test_emulator_reports_out_of_range_global_accesses(emulator, mutant, path, anchor, replacement, kernel):
    q, k, v = make_qkv(2, 1, 1, 17, 17, 64, FP16, device="cpu")
    check_against_reference(emulated(emulator), q, k, v, return_lse=True)  # intact: passes
    broken = mutant(path, anchor, replacement)
    message = rf"{kernel}<float16, 64>: .*global (load|store) of \d+ bytes at 0x[0-9a-f]+ is outside every tensor"
    with pytest.raises(RuntimeError, match=message):
        check_against_reference(emulated(broken), q, k, v, return_lse=True)


# ---------------------------------------------------------------------- on a GPU

gpu = pytest.mark.skipif(not CUDA_READY, reason=f"backend cuda cannot run here: {attn_cuda.status()[1]}")

LENGTHS = (1, 17, 100, 129, 1000)
PAIRS = [(L, S) for L in LENGTHS for S in LENGTHS if L != S]
# (L, S, E, Hq, Hkv, causal, dtype): every L != S pair, cycling through head dims,
# GQA ratios, causal and dtypes, plus square cases
GPU_CASES = [
    (L, S, HEAD_DIMS[i % 5], (2, 4, 8)[i % 3], 2, i % 2 == 0, (FP16, BF16)[(i // 5) % 2])
    for i, (L, S) in enumerate(PAIRS)
] + [(L, L, E, 2, 1, causal, dtype) for L in (129, 1000) for E in HEAD_DIMS for causal, dtype in ((True, FP16), (False, BF16))]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("L,S,E,Hq,Hkv,causal,dtype", GPU_CASES)
def test_matches_reference_gpu(L, S, E, Hq, Hkv, causal, dtype):
    q, k, v = make_qkv(2, Hq, Hkv, L, S, E, dtype)
    check_against_reference(cuda_attention, q, k, v, is_causal=causal, enable_gqa=Hq != Hkv, return_lse=True)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_transposed_and_misaligned_inputs_gpu(dtype):
    B, H, L, S, E = 2, 4, 65, 47, 128
    q = torch.randn(B, L, H, E, device="cuda", dtype=dtype).transpose(1, 2)
    k = torch.randn(B, S, 2, E, device="cuda", dtype=dtype).transpose(1, 2)
    v = torch.randn(B, S, 2, 2 * E, device="cuda", dtype=dtype).transpose(1, 2)[..., ::2]  # last dim strided
    assert not q.is_contiguous() and v.stride(-1) == 2
    check_against_reference(cuda_attention, q, k, v, is_causal=True, enable_gqa=True, return_lse=True)
    flat = torch.randn(B * H * L * E + 1, device="cuda", dtype=dtype)
    q = flat[1:].view(B, H, L, E)  # 2-byte offset: copied to an aligned tensor
    check_against_reference(cuda_attention, q, k, v, enable_gqa=True)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_rows_with_one_key_are_exact_gpu(dtype):
    assert_rows_with_one_key_exact(cuda_attention, "cuda", dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,magnitude,scale", LONE_KEY_CASES)
def test_backward_recomputes_p_of_a_lone_key_as_one_gpu(dtype, magnitude, scale):
    assert_lone_key_p_is_one(cuda_attention, "cuda", dtype, magnitude, scale)


@pytest.mark.gpu
@gpu
def test_offsets_past_2_31_elements_gpu():
    need = 2 * FAR_SPAN + (1 << 30)
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory")
    assert_far_offsets_work(cuda_attention, torch.empty(FAR_SPAN, dtype=FP16, device="cuda"))


@pytest.mark.gpu
@gpu
def test_large_magnitude_scores_gpu():
    q, k, v = make_qkv(1, 2, 1, 100, 129, 64, FP16, magnitude=12.0)
    check_against_reference(cuda_attention, q, k, v, is_causal=True, enable_gqa=True, return_lse=True)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [FP16, BF16])
@pytest.mark.parametrize("L,S,E", [(2048, 2048, 64), (1024, 4096, 128), (3000, 1000, 256)])
def test_long_sequences_gpu(dtype, L, S, E):
    q, k, v = make_qkv(1, 4, 2, L, S, E, dtype)
    check_against_reference(cuda_attention, q, k, v, is_causal=True, enable_gqa=True, return_lse=True)


@pytest.mark.gpu
@gpu
def test_lse_only_and_empty_inputs_gpu():
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 33, 40, 64, FP16))
    _, lse = attn_cuda.fused_attention(q, k, v, False, 0.125)
    lse.sum().backward()  # dout is None: only dlse reaches the backward
    assert q.grad.isfinite().all() and k.grad.isfinite().all() and torch.equal(v.grad, torch.zeros_like(v))
    for L, S in ((0, 5), (5, 0)):
        q, k, v = (t.requires_grad_() for t in make_qkv(2, 2, 2, L, S, 64, BF16))
        out, lse = attn_cuda.fused_attention(q, k, v, True, 0.125)
        ref_out, ref_lse = reference.attention(q.detach(), k.detach(), v.detach(), is_causal=True, return_lse=True)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse.float())
        out.sum().backward()
        assert not q.grad.any() and not k.grad.any() and not v.grad.any()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("deterministic", [True, False])
def test_backward_is_bit_reproducible_gpu(deterministic):
    q, k, v = make_qkv(2, 8, 2, 300, 500, 128, BF16)
    dout = torch.randn(2, 8, 300, 128, device="cuda", dtype=BF16)
    grads = []
    for _ in range(3):
        ins = [t.detach().requires_grad_() for t in (q, k, v)]
        out, _ = attn_cuda.fused_attention(*ins, True, 0.1, deterministic)
        grads.append(torch.autograd.grad(out, ins, dout))
    for run in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], run))


@pytest.mark.gpu
@gpu
def test_opcheck_gpu():
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 4, 2, 37, 71, 64, FP16))
    torch.library.opcheck(torch.ops.attn_kernels.cuda_fwd.default, (q, k, v, True, 0.125, False))
    out, _, lse2 = (t.detach() for t in torch.ops.attn_kernels.cuda_fwd(q, k, v, True, 0.125, False))
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse2)
    args = (dout, q.detach(), k.detach(), v.detach(), out, lse2, dlse, True, 0.125, False)
    torch.library.opcheck(torch.ops.attn_kernels.cuda_bwd.default, args)


@pytest.mark.gpu
@gpu
def test_torch_compile_fullgraph_gpu():
    def block(x, wq, wk, wv):
        q, k, v = (torch.einsum("bld,hde->bhle", x, w) for w in (wq, wk, wv))
        out, _ = attn_cuda.fused_attention(q, k, v, True, 0.125)
        return out.float().square().mean()

    x = torch.randn(2, 50, 32, device="cuda", dtype=BF16)
    weights = [torch.randn(4, 32, 64, device="cuda", dtype=BF16, requires_grad=True) for _ in range(3)]
    results = []
    for run in (block, torch.compile(block, fullgraph=True)):
        loss = run(x, *weights)
        results.append((loss, torch.autograd.grad(loss, weights)))
    (loss_e, grads_e), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss_e, atol=1e-2, rtol=1e-2)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.skipif("cuda" not in getattr(attn_kernels._checks, "BACKENDS", ()), reason="api has no backend 'cuda' yet")
def test_public_api_backend_cuda_gpu():
    q, k, v = make_qkv(2, 4, 2, 100, 129, 64, FP16)

    def api(*args, **kwargs):
        return attn_kernels.fused_attention(*args, backend="cuda", **kwargs)

    check_against_reference(api, q, k, v, is_causal=True, enable_gqa=True, return_lse=True)
