"""Files an export writes beside its graphs: config.json, generation_config.json and the tokenizer
(copied from an HF directory, or a GGUF's tokenizer metadata as JSON), and reading them back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelkin.errors import TokenizerError
from modelkin.tokenizer.write import copy_tokenizer_files

GGUF_TOKENIZER = "tokenizer_gguf.json"  # the tokenizer.* keys of a GGUF's metadata, verbatim


def write_assets(source: Any, source_path: Path, outdir: Path, *, args: Any, dtype: str) -> str | None:
    """Write config.json (+ generation_config.json) and the tokenizer files into ``outdir``.

    ``args`` is the loaded model's ModelArgs: a GGUF without an output tensor ties lm_head to the
    embeddings, which config.json must then say. Returns the tokenizer file written, or None.
    """
    config = dict(source.config())
    generation = config.pop("_generation_config", None)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config["tie_word_embeddings"] = bool(args.tie_word_embeddings)
    config["torch_dtype"] = dtype
    _write_json(outdir / "config.json", config)
    if generation:
        _write_json(outdir / "generation_config.json", generation)
    if source.format == "gguf":
        meta = {k: _plain(v) for k, v in source.metadata().items() if k.startswith("tokenizer.")}
        if not meta.get("tokenizer.ggml.tokens"):
            return None
        _write_json(outdir / GGUF_TOKENIZER, meta)
        return GGUF_TOKENIZER
    copied = copy_tokenizer_files(source_path if source_path.is_dir() else source_path.parent, outdir)
    main = [n for n in ("tokenizer.json", "tokenizer.model") if n in copied]
    return main[0] if main else None


def _plain(value: Any) -> Any:
    """GGUF metadata values as JSON types (numpy scalars and arrays become Python values)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_export_tokenizer(outdir: Path, config: dict[str, Any]) -> Any | None:
    """The Tokenizer of an exported directory (built as the torch engine builds it), or None."""
    from modelkin.tokenizer import Tokenizer, load_tokenizer
    from modelkin.tokenizer.files import read_json

    meta_file = outdir / GGUF_TOKENIZER
    if not meta_file.is_file():
        return load_tokenizer(None, outdir)
    from modelkin.tokenizer.gguf_vocab import gguf_tokenizer_parts

    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{meta_file}: unreadable ({err})", hint="re-export the model") from None
    parts = gguf_tokenizer_parts(meta, str(meta_file))
    if parts is None:
        return None
    return Tokenizer(parts, config=config, generation_config=read_json(outdir / "generation_config.json"))
