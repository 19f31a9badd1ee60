"""Specification of the "twice a pretrained model" recipe, end to end, as the README gives it:
import a Llama made locally with transformers, switch its last 2 layers to twicing, fine-tune with
--init-from on shards made with the model's own Hugging Face tokenizer, evaluate both."""

import json
import shutil

import pytest
import yaml

from conftest import losses_from, run_lm, val_text
from data_prep.corpus import embedded_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pretrained_llama(hf_tokenizer_file, tmp_path_factory):
    """A small random LlamaForCausalLM (8 query heads over 2 kv heads) saved with its tokenizer."""
    transformers = pytest.importorskip("transformers")
    import torch

    from data_prep.tokenizer import load_tokenizer

    vocab = load_tokenizer(hf_tokenizer_file).vocab_size
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("pretrained-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    for f in hf_tokenizer_file.parent.iterdir():
        shutil.copy(f, out / f.name)
    return out


def lm_ok(*args: str, nproc: int = 0):
    result = run_lm(*args, nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_import_twice_the_last_two_layers_fine_tune_and_evaluate(pretrained_llama, tmp_path):
    corpus = tmp_path / "corpus.jsonl"  # a document per line, so that some are held out as val
    corpus.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in embedded_corpus()))
    shards, softmax, twicing = tmp_path / "shards", tmp_path / "softmax", tmp_path / "twicing"
    lm_ok("prep", "--input", str(corpus), "--tokenizer", str(pretrained_llama / "tokenizer.json"), "--out", str(shards))
    lm_ok("convert", "--from-hf", str(pretrained_llama), "--out", str(softmax))
    lm_ok("convert", "--from-hf", str(pretrained_llama), "--out", str(twicing), "--twicing-layers", "last:2")

    # The import's own config, pointed at the shards: the fine-tune's model is the import's.
    config = yaml.safe_load((twicing / "config.yaml").read_text())
    assert config["model"]["arch"] == "llama" and config["model"]["twicing_layers"] == "last:2"
    config["data"] = {"path": str(shards)}
    config["train"] = dict(
        out_dir=str(tmp_path / "run"), steps=20, batch_size=8, micro_batch_size=4, lr=3e-3, min_lr=3e-4,
        warmup_steps=2, eval_interval=0, eval_windows=2, log_interval=5, tensorboard=False,
    )  # fmt: skip
    config["model"]["block_size"] = 32
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump(config))
    lm_ok("train", "--config", str(tmp_path / "finetune.yaml"), "--init-from", str(twicing))
    losses = losses_from(tmp_path / "run")
    assert losses[20] < losses[1] - 0.5, losses  # fine-tuning learns the corpus

    text = tmp_path / "val.txt"
    text.write_text(val_text(4000))
    ppl = {}
    for name, checkpoint in (("softmax import", softmax), ("twicing fine-tuned", tmp_path / "run")):
        result = lm_ok("eval", "--checkpoint", str(checkpoint), "--text", str(text), "--context", "32", "--json")
        ppl[name] = json.loads(result.stdout)["token_ppl"]
    print(f"token perplexity: {ppl}")  # the recipe's report: the fine-tuned twicing model beside the import
    assert ppl["twicing fine-tuned"] < ppl["softmax import"]  # a random import knows no text
