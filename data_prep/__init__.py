"""Data preparation: corpus sources, sentencepiece training, and sharded parallel tokenisation.

corpus.py     documents from text: UTF-8 lines, WikiText article splitting, train/val split
sources.py    corpus sources as restartable streams: files, jsonl, parquet/arrow, HF datasets
wikitext.py   WikiText-103 / -2 from the hub or a local copy, with its own splits
tokenizer.py  sentencepiece training, the Tokenizer, and load_tokenizer / copy_tokenizer for any kind
hf_tokenizer.py  a Hugging Face tokenizer.json behind the same interface
units.py      work units and their part files (one tokenised unit each)
ranks.py      mpi4py ranks when started by mpirun, else a single rank
pipeline.py   corpus -> tokenizer -> units (pool / ranks) -> token shards, resumable
prep.py       `lm prep` and `prepare_shards`
"""
