"""attn_kernels/triton/tuning.py: where a launch's tiles come from (forced, table,
cache, search, first guess), the step-down when a GPU refuses a launch, and that
every tile size the search may pick gives the right answer."""

import json

import pytest
import torch
from accuracy import check_against_reference
from test_attention_fwd import BF16, FP16, FP32, fused, make_qkv
from triton.runtime.errors import OutOfResources

from attn_kernels.triton import tuning
from attn_kernels.triton.launch_config import Blocks

FWD = tuning.Key.of("fwd", BF16, 128, False)


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A fake GPU with its own table and cache directories, and nothing remembered."""
    monkeypatch.setattr(tuning, "TABLE_DIR", tmp_path / "tuned")
    monkeypatch.setenv("ATTN_KERNELS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tuning, "_ran", {})
    monkeypatch.setattr(tuning, "_files", {})
    return tmp_path


def test_keys_share_16bit_dtypes_and_pad_the_head_dim():
    assert tuning.Key.of("fwd", FP16, 100, True) == tuning.Key.of("fwd", BF16, 128, True)
    assert tuning.Key.of("dq", FP32, 40, False).name() == "dq/fp32/d64/full"
    with pytest.raises(ValueError, match="kind"):
        tuning.Key.of("forward", BF16, 64, False)


def test_masked_launches_have_their_own_key_and_smaller_first_tiles(files):
    """A user mask or dropout (not ALiBi, softcap or a band) makes the key "masked": its
    first guess keeps the per-score loads in registers on sm_90 (compile sweep), and a
    table entry for the plain key does not apply to it."""
    from attn_kernels.triton import launch

    q = torch.empty(1, 2, 8, 128, dtype=BF16)
    mask = torch.ones(1, 2, 8, 8, dtype=torch.bool)
    seed = torch.zeros(1, dtype=torch.int64)
    assert launch.score_mods(q, 0.1, mask=mask).masked and launch.score_mods(q, 0.1, seed=seed, dropout_p=0.1).masked
    assert not launch.score_mods(q, 0.1, alibi=torch.ones(1, 2), softcap=5.0, band=(None, 0)).masked
    masked = tuning.Key.of("fwd", BF16, 128, False, masked=True)
    assert masked.name() == "fwd/16bit/d128/full/masked" and FWD.name() == "fwd/16bit/d128/full"
    for kind, dim in (("fwd", 64), ("fwd", 128), ("dq", 128)):
        plain, heavy = (tuning.default(tuning.Key.of(kind, BF16, dim, False, m)) for m in (False, True))
        assert heavy != plain and heavy.BLOCK_M * heavy.BLOCK_N / heavy.num_warps < plain.BLOCK_M * plain.BLOCK_N / \
            plain.num_warps, (kind, dim, plain, heavy)  # fewer scores per thread
    tuning.write_config(tuning.table_path("fake-gpu"), FWD, Blocks(128, 128, 8, 3), {"gpu": "fake-gpu"}, ms=1.0)
    assert tuning.choose(FWD, "fake-gpu")[1] == "table"
    assert tuning.choose(masked, "fake-gpu") == (tuning.default(masked), "default")


def test_choice_order_forced_table_cache_default(files):
    gpu = "fake-gpu"
    assert tuning.choose(FWD, gpu) == (tuning.default(FWD), "default")
    cached, tabled, forced = Blocks(64, 32, 4, 2), Blocks(128, 128, 8, 3), Blocks(16, 16, 4, 1)
    tuning.write_config(tuning.cache_path(gpu), FWD, cached, {"gpu": gpu}, ms=1.0)
    assert tuning.choose(FWD, gpu) == (cached, "cache")
    tuning.write_config(tuning.table_path(gpu), FWD, tabled, {"gpu": gpu}, ms=0.5, default_ms=0.7)
    assert tuning.choose(FWD, gpu) == (tabled, "table")
    with tuning.forced(fwd=forced):
        assert tuning.choose(FWD, gpu) == (forced, "forced")
    assert tuning.choose(FWD, gpu) == (tabled, "table")
    # the interpreter ("cpu") never reads tables
    assert tuning.choose(FWD, "cpu") == (tuning.default(FWD), "default")
    entry = json.loads(tuning.table_path(gpu).read_text())["configs"][FWD.name()]
    assert entry == dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, ms=0.5, default_ms=0.7)


def test_unreadable_files_fall_back_to_the_first_guess(files):
    path = tuning.table_path("fake-gpu")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert tuning.choose(FWD, "fake-gpu") == (tuning.default(FWD), "default")


def _refuse_above(limit):
    """A stand-in launch that a GPU with `limit` units of shared memory would refuse."""
    seen = []

    def launch(blocks):
        seen.append(blocks)
        need = (blocks.BLOCK_M + blocks.BLOCK_N) * blocks.num_stages
        if need > limit:
            raise OutOfResources(need, limit, "shared memory")
        return (torch.ones(3),)

    return launch, seen


def test_a_refused_launch_steps_down_and_is_remembered(files, monkeypatch):
    monkeypatch.setattr(tuning, "gpu_of", lambda device: "small-gpu")
    launch, seen = _refuse_above(200)
    ran = tuning.run(FWD, torch.device("cpu"), launch)
    assert seen == [Blocks(128, 64, 8, 3), Blocks(128, 64, 8, 2), Blocks(128, 64, 8, 1)]
    assert ran == Blocks(128, 64, 8, 1)
    assert tuning.choose(FWD, "small-gpu") == (ran, "this process")
    launch, seen = _refuse_above(100)
    assert tuning.launch_stepping_down(Blocks(128, 64, 8, 1), launch) == Blocks(32, 64, 4, 1)
    launch, _ = _refuse_above(1)
    with pytest.raises(OutOfResources):
        tuning.launch_stepping_down(Blocks(32, 32, 4, 2), launch)


def test_forced_tiles_are_not_remembered(files, monkeypatch):
    monkeypatch.setattr(tuning, "gpu_of", lambda device: "some-gpu")
    with tuning.forced(fwd=Blocks(16, 16, 4, 1)):
        assert tuning.run(FWD, torch.device("cpu"), lambda blocks: ()) == Blocks(16, 16, 4, 1)
    assert tuning.choose(FWD, "some-gpu") == (tuning.default(FWD), "default")


def test_smaller_reaches_the_smallest_tile():
    chain, blocks = [], Blocks(128, 64, 8, 3)
    while blocks is not None:
        chain.append(blocks)
        blocks = tuning.smaller(blocks)
    assert chain[-1] == Blocks(16, 16, 4, 1) and len(chain) == len(set(chain))


def test_search_takes_the_fastest_candidate_that_gives_the_same_result():
    space = [Blocks(64, 32, 4, 2), Blocks(128, 64, 8, 3), Blocks(128, 128, 8, 3), Blocks(64, 64, 4, 3)]
    times = {space[0]: 3.0, space[1]: 2.0, space[2]: 0.5, space[3]: 1.0}
    current = {}

    def launch(blocks):
        if blocks == space[2]:
            raise OutOfResources(1, 0, "shared memory")  # the fastest cannot launch
        current["blocks"] = blocks
        return (torch.full((4,), 7.0 if blocks == space[3] else 1.0), None)  # space[3] computes garbage

    def timer(fn):
        fn()
        return times[current["blocks"]]

    best, ms, default_ms = tuning.search(FWD, launch, timer, space)
    assert (best, ms) == (space[1], 2.0)
    assert space[1] == tuning.default(FWD) and default_ms == 2.0


def test_search_keeps_16bit_outputs_that_differ_by_rounding_only():
    """Another tiling rounds bf16 outputs differently (~1%); a 10% difference is wrong."""
    space = [Blocks(64, 32, 4, 2), Blocks(128, 64, 8, 3), Blocks(128, 128, 8, 3)]
    base = torch.linspace(1, 2, 64, dtype=torch.bfloat16)
    outputs = {space[0]: base, space[1]: base * 1.01, space[2]: base * 1.1}
    times = {space[0]: 3.0, space[1]: 2.0, space[2]: 1.0}
    current = {}

    def launch(blocks):
        current["blocks"] = blocks
        return (outputs[blocks],)

    def timer(fn):
        fn()
        return times[current["blocks"]]

    assert tuning.search(FWD, launch, timer, space)[0] == space[1]


def test_no_search_during_cuda_graph_capture(files, monkeypatch):
    monkeypatch.setenv("ATTN_KERNELS_AUTOTUNE", "1")
    monkeypatch.setattr(tuning, "gpu_of", lambda device: "fake-gpu")
    monkeypatch.setattr(tuning, "_capturing", lambda: True)
    calls = []
    assert tuning.run(FWD, torch.device("cpu"), lambda blocks: calls.append(blocks) or ()) == tuning.default(FWD)
    assert calls == [tuning.default(FWD)] and not tuning.cache_path("fake-gpu").exists()


def test_run_searches_once_then_reads_the_cache(files, monkeypatch):
    """ATTN_KERNELS_AUTOTUNE=1 on a (pretend) GPU: the first launch searches and
    writes the cache; a new process (nothing remembered) reads it back."""
    monkeypatch.setenv("ATTN_KERNELS_AUTOTUNE", "1")
    monkeypatch.setattr(tuning, "gpu_of", lambda device: "fake-gpu")
    monkeypatch.setattr(tuning, "versions", lambda: {"triton": "x"})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    space = tuning.candidates(FWD)
    fastest = space[5]
    monkeypatch.setattr(tuning, "_cuda_timer", lambda fn: (fn(), 1.0 if calls[-1] == fastest else 2.0)[1])
    calls = []

    def launch(blocks):
        calls.append(blocks)
        return (torch.zeros(2),)

    assert tuning.run(FWD, torch.device("cpu"), launch) == fastest
    assert calls[-1] == fastest and len(calls) > len(space)
    saved = json.loads(tuning.cache_path("fake-gpu").read_text())
    assert saved["gpu"] == "Fake GPU" and saved["configs"][FWD.name()]["ms"] == 1.0
    monkeypatch.setattr(tuning, "_ran", {})
    monkeypatch.setattr(tuning, "_files", {})
    calls.clear()
    assert tuning.run(FWD, torch.device("cpu"), launch) == fastest
    assert calls == [fastest]


def _distinct_tiles(kind, dtype, dim):
    """Candidates with distinct (BLOCK_M, BLOCK_N): the interpreter ignores warps and stages."""
    seen = {}
    for blocks in tuning.candidates(tuning.Key.of(kind, dtype, dim, False)):
        seen.setdefault((blocks.BLOCK_M, blocks.BLOCK_N), blocks)
    return list(seen.values())


CANDIDATES = [
    (kind, dtype, dim, blocks)
    for kind, dtype, dim in (("fwd", BF16, 64), ("dkdv", BF16, 64), ("dq", BF16, 64), ("fwd", FP32, 64),
                             ("dkdv", FP16, 256), ("dq", FP32, 128))
    for blocks in _distinct_tiles(kind, dtype, dim)
]


@pytest.mark.parametrize("kind,dtype,dim,blocks", CANDIDATES, ids=lambda x: getattr(x, "name", str(x)))
def test_every_candidate_tile_is_correct(kind, dtype, dim, blocks):
    """What the search may choose must pass the accuracy rule: odd lengths, L != S,
    GQA, causal (tiles cut by the diagonal) and a head dim below the padded one."""
    q, k, v = make_qkv((2,), 4, 2, 100, 129, dim - 8, dim - 8, dtype)
    ran = []
    launch_stepping_down = tuning.launch_stepping_down

    def recorded(b, launch):
        ran.append(launch_stepping_down(b, launch))
        return ran[-1]

    with tuning.forced(**{kind: blocks}), pytest.MonkeyPatch.context() as patch:
        patch.setattr(tuning, "launch_stepping_down", recorded)
        check_against_reference(fused, q, k, v, is_causal=True, enable_gqa=True, grad=kind != "fwd")
    assert blocks in ran  # the forced tiles did run
