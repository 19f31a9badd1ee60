"""Specification of `lm demo` and of the commands that use what it leaves behind.

`lm demo` and `lm eval` run as real processes; the other commands on the demo's run are called in
this process through the same lm.cli.main (they set up no process group and no global state).
"""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_lm
from lm.config import RunConfig
from lm.inference import load_model
from lm.model import GPT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    result = run_lm("demo", "--out", str(out), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_demo_trains_with_falling_loss_and_writes_its_summary(demo_dir):
    summary = json.loads((demo_dir / "summary.json").read_text())
    for key in ("train_loss_start", "train_loss_end", "val_ppl", "seconds"):
        assert key in summary
    assert summary["train_loss_end"] < summary["train_loss_start"] - 2.0
    assert summary["val_ppl"] < summary["val_ppl_start"] / 10
    assert summary["steps"] == 300
    assert summary["sample"]["completion"]
    assert (demo_dir / "checkpoints").is_dir() and (demo_dir / "tokenizer.model").is_file()
    assert (demo_dir / "data" / "manifest.json").is_file()
    assert list((demo_dir / "tensorboard").iterdir())


def test_demo_trained_under_two_processes_with_zero_2(demo_dir):
    marker = json.loads(next((demo_dir / "checkpoints").glob("*/complete.json")).read_text())
    assert marker["world_size"] == 2
    assert marker["config"]["train"]["zero_stage"] == 2
    assert marker["config"]["model"]["twicing_layers"] == "last:2"


def test_demo_refuses_a_directory_that_is_not_empty(demo_dir, lm_in_process):
    before = (demo_dir / "summary.json").read_bytes()
    result = lm_in_process("demo", "--out", str(demo_dir))
    assert result.returncode == 2 and result.stderr.strip().startswith("error: ") and "not empty" in result.stderr
    assert (demo_dir / "summary.json").read_bytes() == before


def test_eval_reports_perplexities_as_json(demo_dir):
    result = run_lm("eval", "--checkpoint", str(demo_dir), "--text", str(demo_dir / "data" / "val.txt"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("token_ppl", "word_ppl", "bits_per_byte", "tokens", "words", "bytes"):
        assert key in report
    summary = json.loads((demo_dir / "summary.json").read_text())
    assert report["token_ppl"] == pytest.approx(summary["eval"]["token_ppl"], rel=1e-6)
    assert 1 < report["token_ppl"] < 2048


def test_generate_continues_a_prompt(demo_dir, lm_in_process):
    result = lm_in_process(
        "generate",
        "--checkpoint",
        str(demo_dir),
        "--prompt",
        "The import",
        "--prompt",
        "A list",
        "--max-new-tokens",
        "12",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    outputs = json.loads(result.stdout)["outputs"]
    assert [o["prompt"] for o in outputs] == ["The import", "A list"]
    assert all(o["completion"] for o in outputs)


def test_generate_refuses_a_prompt_longer_than_the_context(demo_dir, lm_in_process):
    result = lm_in_process("generate", "--checkpoint", str(demo_dir), "--prompt", "word " * 400)
    assert result.returncode == 2 and "longer than the model's context of 128" in result.stderr


def test_convert_writes_weights_that_give_the_training_models_logits(demo_dir, tmp_path, lm_in_process):
    result = lm_in_process("convert", "--checkpoint", str(demo_dir), "--out", str(tmp_path / "converted"))
    assert result.returncode == 0, result.stderr
    config = RunConfig.from_dict(yaml.safe_load((tmp_path / "converted" / "config.yaml").read_text()))
    model = GPT(config.model).eval()
    missing, unexpected = model.load_state_dict(load_file(tmp_path / "converted" / "model.safetensors"), strict=False)
    assert missing == ["transformer.wte.weight"] and not unexpected  # stored once, tied to lm_head
    trained, _, _ = load_model(demo_dir)
    ids = torch.randint(0, config.model.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], trained(ids)[0], rtol=0, atol=0)


def test_hf_export_of_the_demo_loads_in_transformers_with_the_same_logits(
    demo_dir, tmp_path, monkeypatch, lm_in_process
):
    import transformers.dynamic_module_utils as dynamic_modules
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    result = lm_in_process("convert", "--checkpoint", str(demo_dir), "--out", str(tmp_path / "hf"), "--to", "hf")
    assert result.returncode == 0, result.stderr
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    ours, _, _ = load_model(demo_dir)
    ids = torch.randint(0, 2048, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids)[0], rtol=1e-5, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    from data_prep.tokenizer import Tokenizer

    text = "The import statement binds names."
    assert tokenizer(text)["input_ids"] == Tokenizer(demo_dir / "tokenizer.model").encode(text)
