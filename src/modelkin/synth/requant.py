"""Re-quantisation through the gguf package: a dense Llama checkpoint written as a llama.cpp-layout GGUF whose
matrices are quantised (Q8_0, Q4_0, ...) by ``gguf.quants.quantize``, with a GGUF vocabulary copied from
another file; modelkin's GGUF reader reads it back (dequantised) as the derived model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from modelkin.errors import InputError

_ARCH_KEYS = {  # HF config key -> llama.cpp metadata key (under "llama.")
    "num_hidden_layers": "block_count", "max_position_embeddings": "context_length",
    "hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count", "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length", "vocab_size": "vocab_size",
}


def _put(writer: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))


def write_quantised_gguf(source: str | os.PathLike[str], out: str | os.PathLike[str], *, qtype: str = "Q8_0",
                         vocabulary_from: str | os.PathLike[str]) -> Path:
    """Write dense Llama ``source`` as GGUF file ``out`` with every matrix stored as ``qtype``.

    Norm gains stay float32; q/k rows get llama.cpp's RoPE permutation (the reader undoes it); a tied
    model writes no ``output.weight``. ``vocabulary_from`` is a GGUF whose ``tokenizer.*`` metadata is
    copied (the source's own vocabulary, as a converter would write it).

    Raises:
        InputError: an unknown ``qtype``, a source that is not a Llama, or a matrix whose rows do not
            split into the type's blocks.
    """
    import gguf
    import numpy as np

    from modelkin.checkpoint import open_checkpoint
    from modelkin.checkpoint.gguf_names import hf_to_gguf
    from modelkin.checkpoint.gguf_reader import permute_rows
    from modelkin.synth.variants import read_dense
    from modelkin.utils import atomic_path

    try:
        quant = gguf.GGMLQuantizationType[qtype]
    except KeyError:
        raise InputError(f"unknown GGUF type {qtype!r}", hint="e.g. Q8_0, Q4_0, Q4_1, Q5_0") from None
    config, tensors = read_dense(source)
    if config.get("model_type") != "llama":
        raise InputError(f"{source}: model_type {config.get('model_type')!r}", hint="pass a Llama checkpoint")
    with open_checkpoint(vocabulary_from) as vocab:
        meta = {k: v for k, v in vocab.metadata().items() if k.startswith("tokenizer.")}
    block = gguf.GGML_QUANT_SIZES[quant][0]
    heads = {"q_proj": int(config["num_attention_heads"]),
             "k_proj": int(config.get("num_key_value_heads") or config["num_attention_heads"])}
    out = Path(out)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(f"{Path(source).name} {qtype}")
        for hf_key, key in _ARCH_KEYS.items():
            if config.get(hf_key) is not None:
                writer.add_uint32(f"llama.{key}", int(config[hf_key]))
        writer.add_float32("llama.rope.freq_base", float(config.get("rope_theta") or 10000.0))
        writer.add_float32("llama.attention.layer_norm_rms_epsilon", float(config.get("rms_norm_eps") or 1e-5))
        hd = int(config.get("head_dim") or int(config["hidden_size"]) // heads["q_proj"])
        writer.add_uint32("llama.rope.dimension_count", hd)
        for key, value in meta.items():
            _put(writer, key, value)
        for name in sorted(tensors):
            if name == "lm_head.weight" and config.get("tie_word_embeddings"):
                continue
            mapped = hf_to_gguf(name, "llama")
            if mapped is None:
                continue
            t = tensors[name]
            proj = name.split(".")[-2]
            if proj in heads and name.endswith(".weight"):
                t = permute_rows(t, heads[proj])
            array = t.numpy().astype(np.float32)
            if array.ndim < 2:
                writer.add_tensor(mapped[0], array)
                continue
            if array.shape[-1] % block:
                raise InputError(f"{name} rows of {array.shape[-1]} do not split into {qtype} blocks of {block}",
                                 hint="choose a type with smaller blocks (Q8_0/Q4_0 use 32)")
            writer.add_tensor(mapped[0], gguf.quants.quantize(array, quant), raw_dtype=quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out
