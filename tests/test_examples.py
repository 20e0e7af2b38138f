"""Each example in examples/ trains for a few steps: it runs, its loss falls, and it
reports its metric. The full runs (minutes each) are in examples/README.md."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# name: (steps for the test, the metric it must report, modules it needs beyond torch)
CASES = {
    "translation": (24, "token_accuracy", ()),
    "summarization": (40, "sentence_f1", ()),
    "ner_tagging": (16, "entity_f1", ()),
    "vit_digits": (24, "test_accuracy", ("sklearn",)),
    "detection": (16, "mean_iou", ("scipy",)),
    "generation": (16, "sample_class_match", ("sklearn", "matplotlib")),
}


def load_example(name: str):
    """Imports examples/<name>.py by path (examples/ is not a package)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))  # the examples import their shared `common`
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _keep_thread_count():
    # the examples set torch's CPU thread count (--threads); give the worker its own back
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_trains(name, tmp_path):
    steps, metric, needs = CASES[name]
    for module in needs:
        pytest.importorskip(module)
    argv = ["--steps", str(steps), "--seed", "0"]
    if name == "generation":
        argv += ["--out", str(tmp_path / "samples.png")]
    results = load_example(name).main(argv)
    assert math.isfinite(results["first_loss"]) and math.isfinite(results["last_loss"])
    assert results["last_loss"] < results["first_loss"], results
    assert 0.0 <= results[metric] <= 1.0, results
    if name == "generation":
        assert (tmp_path / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seed_example_heatmap(tmp_path):
    pytest.importorskip("matplotlib")
    results = load_example("plot_seed_example").main(["--out", str(tmp_path / "seed.png")])
    assert results["weights"] == pytest.approx([0.2984, 0.2942, 0.4073], abs=1e-4)
    assert (tmp_path / "seed.png").stat().st_size > 0


def test_bad_steps_are_refused():
    with pytest.raises(SystemExit):
        load_example("translation").main(["--steps", "0"])


def test_context_parallel_llama_matches_one_process():
    # 2 gloo processes (launched by the example) against the same training in one process, in float64
    results = load_example("context_parallel_llama").main(["--steps", "3", "--seed", "0"])
    assert results["world_size"] == 2 and results["scheme"] == "ring"
    assert results["last_loss"] < results["first_loss"], results
    assert results["max_loss_diff"] < 1e-10, results
    assert results["max_grad_diff"] < 1e-10, results
    assert results["max_param_diff"] < 1e-9, results
