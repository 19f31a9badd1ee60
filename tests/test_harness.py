"""Specification of `lm harness`: lm-evaluation-harness tasks on our checkpoints (lm.harness, lm.harness_lm).

The tasks are local (tests/harness_task: YAML configs, their jsonl documents and a loader), since the
hub cannot be reached here: multiple choice, rolling log-likelihood and generation. Our adapter runs
them once per module with windows shorter than the model's context, so that long inputs are scored
in several windows; then each answer is held against an independent computation of it: lm-eval's
own Hugging Face backend on our HF export, `lm eval`, `lm generate`.
"""

import json
import sys

import pytest

from conftest import REPO, assert_one_error_line, run_lm

TASKS = REPO / "tests" / "harness_task"
NAMES = ["twicing_choices", "twicing_rolling", "twicing_completion"]
CONTEXT, STRIDE = 24, 8  # the tiny model's context is 32
# simple_evaluate seeds Python's, numpy's and torch's global generators by default; in this process
# the tests leave them alone (no task here samples).
NO_GLOBAL_SEEDS = dict(random_seed=None, numpy_random_seed=None, torch_random_seed=None)


@pytest.fixture(scope="module")
def harness(trained_tiny_run):
    """(our adapter, its lm-eval results with per-sample responses) on the three local tasks."""
    pytest.importorskip("lm_eval")
    from lm.harness import evaluate_tasks, harness_model, task_manager

    lm = harness_model(trained_tiny_run, CONTEXT, STRIDE)
    manager = task_manager(NAMES, str(TASKS))
    return lm, evaluate_tasks(lm, NAMES, manager, log_samples=True, **NO_GLOBAL_SEEDS)


def responses(results, task) -> list[list]:
    """Per document (in document order), the adapter's answer to each of its requests."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[r[0] for r in s["resps"]] for s in samples]


def test_multiple_choice_matches_lm_evals_own_hf_backend_on_our_export(
    harness, trained_tiny_run, tmp_path, private_modules_cache
):
    from lm_eval import simple_evaluate

    from lm.convert import convert
    from lm.harness import task_manager

    _, ours = harness
    export = convert(str(trained_tiny_run), tmp_path / "hf", to="hf")  # twicing: its own modeling file
    theirs = simple_evaluate(
        model="hf",
        model_args=f"pretrained={export},trust_remote_code=True,dtype=float32,max_length={CONTEXT}",
        device="cpu",
        batch_size=4,
        tasks=["twicing_choices"],
        task_manager=task_manager(["twicing_choices"], str(TASKS)),
        log_samples=True,
        **NO_GLOBAL_SEEDS,
    )
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["twicing_choices"][metric] == theirs["results"]["twicing_choices"][metric]
    a, b = responses(ours, "twicing_choices"), responses(theirs, "twicing_choices")
    assert [len(choices) for choices in a] == [4] * 12 and len(b) == 12
    for mine, hf in zip(a, b):
        assert [greedy for _, greedy in mine] == [greedy for _, greedy in hf]
        assert max(abs(x - y) for (x, _), (y, _) in zip(mine, hf)) < 1e-4


def test_rolling_loglikelihood_is_the_total_nll_of_lm_eval_with_the_same_windows(
    harness, trained_tiny_run, tmp_path, lm_in_process
):
    _, ours = harness
    documents = [json.loads(line)["text"] for line in (TASKS / "rolling.jsonl").read_text().splitlines()]
    for text, (loglikelihood,) in zip(documents, responses(ours, "twicing_rolling")):
        (tmp_path / "doc.txt").write_text(text, encoding="utf-8")
        windows = ["--context", str(CONTEXT), "--stride", str(STRIDE)]
        result = lm_in_process(
            "eval", "--checkpoint", str(trained_tiny_run), "--text", str(tmp_path / "doc.txt"), *windows, "--json"
        )
        report = json.loads(result.stdout)
        assert abs(-loglikelihood - report["nll"]) <= 1e-6 * report["nll"]
    assert report["tokens"] < CONTEXT  # the short last document; the others take many windows
    assert ours["results"]["twicing_rolling"]["word_perplexity,none"] > 1


def test_generation_is_greedy_lm_generate_cut_at_the_first_stop_string(harness, trained_tiny_run, lm_in_process):
    _, ours = harness
    samples = sorted(ours["samples"]["twicing_completion"], key=lambda s: s["doc_id"])
    prompts = [s["arguments"][0][0] for s in samples]
    result = lm_in_process(
        "generate", "--checkpoint", str(trained_tiny_run), "--temperature", "0", "--max-new-tokens", "12", "--json",
        *[a for p in prompts for a in ("--prompt", p)],
    )  # fmt: skip
    for sample, out in zip(samples, json.loads(result.stdout)["outputs"]):
        expected = out["completion"]
        for stop in ("\n", "."):  # the task's `until`
            expected = expected.split(stop)[0]
        assert sample["resps"][0][0] == expected


def test_batched_scores_equal_one_request_at_a_time(harness):
    from lm_eval.api.instance import Instance

    lm, _ = harness
    pairs = [("Python supports", " string literals"), ("", "The import statement"), ("A ", "class"), ("x" * 90, " y")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    batched = lm.loglikelihood(requests)
    lm.batch_size = 1
    try:
        alone = [lm.loglikelihood([r])[0] for r in requests]
    finally:
        lm.batch_size = 8
    for (a, greedy_a), (b, greedy_b) in zip(batched, alone):
        assert abs(a - b) <= 1e-5 * abs(b) and greedy_a == greedy_b


@pytest.mark.slow
def test_lm_harness_prints_lm_evals_results_with_accuracy_fields_as_json(trained_tiny_run):
    pytest.importorskip("lm_eval")
    result = run_lm(
        "harness", "--checkpoint", str(trained_tiny_run), "--tasks", "twicing_choices,twicing_rolling",
        "--include-path", str(TASKS), "--limit", "6", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout)  # stdout holds the JSON object and nothing else
    choices = results["results"]["twicing_choices"]
    assert 0 <= choices["acc,none"] <= 1 and 0 <= choices["acc_norm,none"] <= 1 and "acc_stderr,none" in choices
    assert results["n-samples"]["twicing_choices"]["effective"] == 6
    assert results["results"]["twicing_rolling"]["bits_per_byte,none"] > 0
    assert results["config"]["context"] == 32 and results["config"]["checkpoint"].endswith("step00000120")


def test_without_lm_eval_one_line_says_how_to_install_it(tmp_path, lm_in_process, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails, as if not installed
    result = lm_in_process("harness", "--checkpoint", str(tmp_path), "--tasks", "hellaswag")  # said first
    assert_one_error_line(result, "pip install 'twicing-lm[eval]'")
