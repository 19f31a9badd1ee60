"""Corpus sources, sentencepiece training and sharded tokenisation into token shards."""
