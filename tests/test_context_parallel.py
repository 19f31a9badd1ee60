"""Specification of context and sequence parallelism: every layout trains the loss curve of one plain process.

Two launches train every layout of a tiny model (a softmax layer, then a twicing layer), with
learned positions (GPT-2's layout) and with RoPE (Llama's): two processes for sequence parallelism
under TP2 and for each context-parallel strategy over two ranks, with a resume; four processes
for TP2 x CP2 with each strategy and CP2 x DP2 under ZeRO-2. Each run's per-step losses equal the
plain single-process loop's over 10 steps, and its checkpoint, consolidated into one model,
computes the logits the trained layout did.
"""

import json
from pathlib import Path

import pytest
import torch

from conftest import relative_error, run_torchrun, tiny_run_config, write_config
from lm.inference import load_model

# fp32: a chunk's mean loss and its gradients differ from the whole sequence's by rounding only.
TOLERANCE = 1e-5
STEPS = {"steps": 10}
# Four query heads, so that TP2 x CP2 all_to_all still gives each rank one whole head.
MODELS = {
    "learned": dict(n_head=4),
    "rope": dict(arch="llama", n_head=4, n_kv_head=2),  # grouped-query attention too
}
FOUR_RANK_MODELS = {"learned": dict(n_head=4), "rope": dict(arch="llama", n_head=4, n_kv_head=4)}


def layout(**train) -> dict:
    return {**STEPS, **train}


TWO_RANKS = {
    "sp-tp2": layout(tensor_parallel=2, sequence_parallel=True),
    "cp2-all_to_all": layout(context_parallel=2, context_parallel_impl="all_to_all"),
    "cp2-ring": layout(context_parallel=2, context_parallel_impl="ring", zero_stage=1),
}
FOUR_RANKS = {
    "tp2-cp2-all_to_all": layout(tensor_parallel=2, context_parallel=2, context_parallel_impl="all_to_all"),
    "tp2-cp2-ring": layout(tensor_parallel=2, context_parallel=2, sequence_parallel=True),
    "cp2-dp2-zero2": layout(context_parallel=2, zero_stage=2),
}


def runs_for(shards, root: Path, layouts: dict, models: dict) -> dict:
    return {
        f"{name}-{position}": {"config": tiny_run_config(shards, root / f"{name}-{position}", model, train)}
        for name, train in layouts.items()
        for position, model in models.items()
    }


def launch(nproc: int, runs: dict, root: Path) -> dict:
    (root / "runs.json").write_text(json.dumps(runs))
    result = run_torchrun(nproc, "layouts_run.py", str(root / "runs.json"), str(root / "out.json"))
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((root / "out.json").read_text())


@pytest.fixture(scope="module")
def two_rank_runs(tiny_shards, tmp_path_factory):
    """Every two-process layout, plus a CP2 ring run stopped at step 5 and resumed, once as CP2 and once
    without context parallelism (as TP1 x DP2). Read-only."""
    root = tmp_path_factory.mktemp("cp-two")
    runs = runs_for(tiny_shards, root, TWO_RANKS, MODELS)
    ring = runs["cp2-ring-learned"]["config"]
    for name, resume_cp in (("cp2-ring-resumed", 2), ("cp2-resumed-as-dp2", 1)):
        config = json.loads(json.dumps(ring))
        config["train"]["out_dir"] = str(root / name)
        resume = json.loads(json.dumps(config))
        resume["train"]["context_parallel"] = resume_cp
        runs[name] = {"config": config, "stop_at": 5, "resume": resume}
    return runs, launch(2, runs, root)


@pytest.fixture(scope="module")
def four_rank_runs(tiny_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("cp-four")
    runs = runs_for(tiny_shards, root, FOUR_RANKS, FOUR_RANK_MODELS)
    return runs, launch(4, runs, root)


def check_against_plain(runs: dict, results: dict, plain_losses, names) -> None:
    for name in names:
        reference = plain_losses(runs[name]["config"])
        assert results[name]["losses"] == pytest.approx(reference, rel=TOLERANCE), name
        # The checkpoint is a plain model's: consolidated, it computes what the trained layout did.
        model = load_model(Path(results[name]["run_dir"]))[0]
        ids = torch.arange(model.config.block_size).remainder(model.config.vocab_size)[None]
        with torch.no_grad():
            logits = model(ids)[0].flatten()
        assert relative_error(logits, torch.tensor(results[name]["logits"])) <= TOLERANCE, name


@pytest.mark.slow
def test_sequence_parallel_and_each_context_parallel_strategy_over_two_ranks_train_the_plain_loss_curve(
    two_rank_runs, plain_losses
):
    runs, results = two_rank_runs
    names = [f"{layout}-{position}" for layout in TWO_RANKS for position in MODELS]
    check_against_plain(runs, results, plain_losses, names)
    assert results["cp2-ring-learned"]["layout"] == [1, 2, 1]  # TP, CP, DP
    assert results["sp-tp2-rope"]["layout"] == [2, 1, 1]


@pytest.mark.slow
def test_a_context_parallel_run_resumes_bitwise_and_resumes_without_context_parallelism(two_rank_runs, plain_losses):
    runs, results = two_rank_runs
    assert results["cp2-ring-resumed"]["losses"] == results["cp2-ring-learned"]["losses"]  # bitwise
    moved = results["cp2-resumed-as-dp2"]
    assert moved["layout"] == [1, 1, 2]
    assert moved["losses"][:5] == results["cp2-ring-learned"]["losses"][:5]
    assert moved["losses"] == pytest.approx(plain_losses(runs["cp2-resumed-as-dp2"]["config"]), rel=TOLERANCE)


@pytest.mark.slow
def test_tp2_x_cp2_with_each_strategy_and_cp2_x_dp2_under_zero2_train_the_plain_loss_curve(
    four_rank_runs, plain_losses
):
    runs, results = four_rank_runs
    check_against_plain(runs, results, plain_losses, list(runs))
    assert results["cp2-dp2-zero2-learned"]["layout"] == [1, 2, 2]
    assert results["tp2-cp2-ring-rope"]["layout"] == [2, 2, 1]


def test_plan_counts_context_parallel_ranks_and_refuses_a_world_they_do_not_divide(
    tiny_shards, tmp_path, lm_in_process
):
    from lm.config import RunConfig
    from lm.plan import plan

    def config(**train) -> dict:
        return tiny_run_config(tiny_shards, tmp_path / "run", {"n_head": 4}, {"zero_stage": 3, **train})

    one, two = plan(RunConfig.from_dict(config()), 2), plan(RunConfig.from_dict(config(context_parallel=2)), 2)
    assert two.activations < 0.6 * one.activations  # half the tokens per rank
    assert two.weights == one.weights  # ZeRO-3 partitions over DP x CP: two ranks either way
    path = write_config(tmp_path / "cp2.yaml", config(context_parallel=2))
    result = lm_in_process("plan", "--config", str(path), "--world", "3")
    assert result.returncode == 2 and "tensor_parallel=1 x context_parallel=2" in result.stderr


@pytest.mark.parametrize("impl", ["ring", "all_to_all"])
def test_the_cp_ranks_chunks_cover_each_window_once_and_keep_inputs_and_targets_aligned(impl):
    from lm.parallel.context import ContextLayout

    rows = torch.arange(2 * 17).view(2, 17)  # two windows of T + 1 = 17 tokens
    layouts = [ContextLayout(2, rank, impl) for rank in range(2)]
    chunks = [layout.chunk(rows) for layout in layouts]
    positions = layouts[0].gathered_positions(16)
    assert sorted(positions.tolist()) == list(range(16))
    for layout, (inputs, targets) in zip(layouts, chunks):
        assert inputs.shape == targets.shape == (2, 8)
        assert torch.equal(targets, inputs + 1)  # each target is the token after its input
        assert torch.equal(inputs[0], layout.positions(16))  # the rank's global positions, in its order
    if impl == "ring":  # zigzag: an early and a late quarter each
        assert layouts[0].positions(16).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    else:
        assert layouts[1].positions(16).tolist() == list(range(8, 16))
