"""Pre-tokenized image codes on disk: sharded safetensors files plus an ``index.json``.

Training on codes instead of pixels removes the tokenizer from the training loop (LlamaGen and
AiM both pre-tokenize ImageNet). ``aimkit tokenize`` writes a directory like::

    tokens/
      index.json              # what the shards hold; see below
      shard-00000.safetensors # codes (n, V, N) uint16, labels (n,) int64
      shard-00001.safetensors
      ...

Every image is stored in ``V`` augmentation *variants* (``V = 1``: a centre crop; ``2``: plus its
mirror image; ``10``: LlamaGen's ten crops, i.e. four corners and the centre, each also
mirrored). :class:`TokenDataset` serves one variant per image and epoch.

``index.json`` records::

    format        1
    tokenizer     registry name of the tokenizer ("vq-f16")
    tokenizer_record  which tokenizer made the codes: name, config, weight fingerprint and how
                  to rebuild it (see :mod:`aimkit.data.provenance`); absent in older folders
    codebook_size codes are in [0, codebook_size)
    image_size    pixels per side of the crops that were encoded (256)
    grid_size     codes per side (16); num_tokens = grid_size ** 2
    variants      names of the V variants, in storage order (["center", "center-flip"])
    classes       class names, index = label (the sub-folder names of the image tree, empty
                  class folders included)
    shard_size    planned images per shard (the last shard may hold fewer)
    shards        [{"file", "start", "stop", "count", "skipped", "completed", "bytes", "sha256"}, ...]
                  start/stop: the shard's slice of the sorted source file list;
                  count: images stored (stop - start - skipped);
                  bytes/sha256: size and checksum of the finished file (null until written)
    complete      every shard is written
    source        anything the writer wants to remember (the image root, ...)

Shards appear atomically (temporary file + rename), so a shard file that exists was complete
when written. Damage after that (a cut copy, flipped bytes) is caught by the recorded size and
checksum: a rerun of ``aimkit tokenize`` checks every finished shard and redoes a damaged one,
and :class:`TokenDataset` refuses to read one (``verify="full"``, the default, reads every
shard once at construction: checksum, code range, labels; ``verify="size"`` checks only sizes,
headers and labels, and then each item's codes as it is read, for very large folders).

The package: ``_index`` (the index schema, checked reading), ``_shard_file`` (one shard file:
parsing, checking, reproducible writing), ``_writer`` (:class:`TokenShardWriter`) and ``_dataset``
(:class:`TokenDataset`); :mod:`aimkit.data.tokenize` encodes an image folder with the writer.

Example:
    >>> ds = TokenDataset("tokens/", variant="random", seed=0)
    >>> ds.set_epoch(3)
    >>> codes, label = ds[17]      # int64 (256,), int64 ()
"""

from __future__ import annotations

from ._dataset import VARIANT_POLICIES, VERIFY_MODES, TokenDataset
from ._index import FORMAT_VERSION, INDEX_NAME, read_index, shard_name
from ._shard_file import check_shard, code_dtype
from ._writer import TokenShardWriter

__all__ = [
    "INDEX_NAME",
    "FORMAT_VERSION",
    "VARIANT_POLICIES",
    "VERIFY_MODES",
    "shard_name",
    "code_dtype",
    "TokenShardWriter",
    "TokenDataset",
    "read_index",
    "check_shard",
]
