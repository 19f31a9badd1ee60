"""Token shards: the one on-disk format between data preparation and training.

A shard directory holds

    manifest.json          what is here: format version, vocab, tokenizer (path, checksum, kind), shards
    train-00000.bin        flat little-endian token ids (uint16 if the vocab fits, else uint32)
    train-00000.idx        little-endian uint64 document start offsets, documents + 1 entries
    ...                    (the last entry is the shard's token count)
    val-00000.bin / .idx

Every document is followed by one end-of-document (eod) token, counted in its span, so
document d of a shard is tokens[idx[d]:idx[d + 1]] and its last token is eod. Documents are
never split across shards. Files are written under a temporary name and renamed into place
when complete, and the manifest is written last: a directory with a manifest is complete.

This package is the only place that writes (writer) or reads (reader) the format.
"""

from data_prep.shards.format import FORMAT, INDEX_DTYPE, MANIFEST, VERSION, dtype_for_vocab, sha256_file
from data_prep.shards.reader import ShardSet
from data_prep.shards.writer import ShardWriter, write_manifest

__all__ = [
    "FORMAT",
    "INDEX_DTYPE",
    "MANIFEST",
    "VERSION",
    "ShardSet",
    "ShardWriter",
    "dtype_for_vocab",
    "sha256_file",
    "write_manifest",
]
