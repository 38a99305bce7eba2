"""Hugging Face model directories: lazy safetensors reads and an atomic, streaming sharded writer.

Reading: :meth:`Checkpoint.open` parses ``config.json`` and the safetensors headers only; a tensor is
read when asked for, with ``pread`` through a cached file handle per shard (:meth:`Checkpoint.read`:
resident memory stays the tensors in use) or mapped (:meth:`Checkpoint.map`: no copy, for streaming
merges that drop each tensor once used). Pickled weights are refused. Tied embeddings are virtual:
``lm_head.weight`` of a tied model reads the embedding.

Writing: :class:`CheckpointWriter` is told every tensor up front, lays the shards out, writes each
shard's header first and then every tensor's bytes straight to its offset, so peak memory is one
tensor. Everything goes to a temporary directory beside the output, renamed into place by
:meth:`CheckpointWriter.finish`; a failure leaves the output untouched.

The package, one module per concept (every public name is re-exported here):

* :mod:`~evomerge.checkpoint.names`: file names, tokenizer files, dtype names, layer tensor names
  (:func:`split_layer_name`, :func:`layer_tensor_name`), byte sizes (:func:`parse_size`);
* :mod:`~evomerge.checkpoint.reader`: :class:`Checkpoint`, safetensors header parsing, local
  path / hub id resolution;
* :mod:`~evomerge.checkpoint.checks`: config against tensors (:func:`completeness_problems`),
  :func:`check_compatible`, :func:`has_tokenizer`;
* :mod:`~evomerge.checkpoint.writer`: :class:`CheckpointWriter`, :class:`TensorSpec`;
* :mod:`~evomerge.checkpoint.output`: output-path checks (:func:`check_output_path`), writers'
  temporary folders, their owner records and stale-folder cleanup (:func:`remove_stale_temps`);
* :mod:`~evomerge.checkpoint.oserrors`: :func:`describe_os_error`, :func:`os_error_hint`;
* :mod:`~evomerge.checkpoint.device`: :func:`check_device`.
"""

from evomerge.checkpoint.checks import (HIDDEN_KEYS, LAYER_KEYS, check_compatible,
                                        completeness_problems, has_tokenizer)
from evomerge.checkpoint.checks import _problem_text as _problem_text  # materialize's error text
from evomerge.checkpoint.device import DEVICE_HINT, check_device
from evomerge.checkpoint.names import (DTYPE_NAMES, DTYPES, EMBED_SUFFIXES, INDEX_FILE, SINGLE_FILE, SIZE_HINT,
                                       TIED_HEAD, TOKENIZER_CORE, TOKENIZER_FILES, layer_tensor_name, parse_size,
                                       split_layer_name)
from evomerge.checkpoint.oserrors import describe_os_error, os_error_hint
from evomerge.checkpoint.output import OWNER_FILE, check_output_path, remove_stale_temps
from evomerge.checkpoint.output import owner_record as owner_record  # who made a temporary folder (pid, host, boot, start)
from evomerge.checkpoint.reader import CONVERT_HINT, HUB_PATTERNS, PICKLE_SUFFIXES, Checkpoint
from evomerge.checkpoint.writer import CheckpointWriter, TensorSpec

__all__ = [
    "CONVERT_HINT", "DEVICE_HINT", "DTYPES", "DTYPE_NAMES", "EMBED_SUFFIXES", "HIDDEN_KEYS", "HUB_PATTERNS",
    "INDEX_FILE", "LAYER_KEYS", "OWNER_FILE", "PICKLE_SUFFIXES", "SINGLE_FILE", "SIZE_HINT", "TIED_HEAD",
    "TOKENIZER_CORE", "TOKENIZER_FILES", "Checkpoint", "CheckpointWriter", "TensorSpec", "check_compatible",
    "check_device", "check_output_path", "completeness_problems", "describe_os_error",
    "has_tokenizer", "layer_tensor_name", "os_error_hint", "parse_size", "remove_stale_temps",
    "split_layer_name",
]
