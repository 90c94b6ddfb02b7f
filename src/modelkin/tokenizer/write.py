"""A checkpoint's tokenizer written as HF files: the one list of tokenizer files an HF directory copy takes,
and the one writer of a GGUF byte-level BPE vocabulary as tokenizer.json + tokenizer_config.json.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modelkin.errors import TokenizerError

# Every file of an HF directory that a tokenizer is read from: modelkin's loader (tokenizer.json,
# tokenizer.model, tokenizer_config.json, special_tokens_map.json, chat_template.jinja, and
# generation_config.json for its end-of-generation ids) and transformers' (slow-tokenizer vocab.json and
# merges.txt, added_tokens.json, the older chat_template.json). Named templates sit in CHAT_TEMPLATE_DIR.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
)
CHAT_TEMPLATE_DIR = "additional_chat_templates"


def copy_tokenizer_files(folder: str | Path, outdir: str | Path) -> list[str]:
    """Copy the tokenizer files of HF directory ``folder`` into ``outdir``; returns the names copied.

    Writes in place: callers hand it the temporary directory of an ``atomic_path`` block.
    """
    folder, outdir = Path(folder), Path(outdir)
    copied = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    for name in copied:
        shutil.copyfile(folder / name, outdir / name)
    templates = sorted((folder / CHAT_TEMPLATE_DIR).glob("*.jinja"))
    if templates:
        (outdir / CHAT_TEMPLATE_DIR).mkdir(exist_ok=True)
        for file in templates:
            shutil.copyfile(file, outdir / CHAT_TEMPLATE_DIR / file.name)
            copied.append(f"{CHAT_TEMPLATE_DIR}/{file.name}")
    return copied


def write_gguf_tokenizer(meta: Mapping[str, Any], where: str, outdir: str | Path) -> list[str]:
    """Write the byte-level BPE vocabulary of GGUF metadata ``meta`` as HF tokenizer files in ``outdir``.

    tokenizer.json's post-processor adds BOS and EOS as the GGUF's add_bos/add_eos flags say (as modelkin's
    GGUF tokenizer does); tokenizer_config.json carries the flags, the special tokens and every chat
    template; generation_config.json is written only when the GGUF names end-of-generation ids beyond EOS
    (eot/eom), so that those still stop generation. Writes in place (an ``atomic_path`` temporary directory).

    Returns:
        The names of the files written.

    Raises:
        TokenizerError: no vocabulary, or a SentencePiece ('llama') one: no tokenizer.json form here.
    """
    from tokenizers import Tokenizer

    from modelkin.tokenizer.gguf_vocab import gguf_tokenizer_parts

    outdir = Path(outdir)
    parts = gguf_tokenizer_parts(meta, where)
    if parts is None:
        raise TokenizerError(f"{where} carries no tokenizer vocabulary", hint="use a checkpoint that has one")
    source_tk = getattr(parts.backend, "tk", None)
    if source_tk is None:
        raise TokenizerError(
            f"{where}: only byte-level BPE (gpt2-style) GGUF vocabularies can be written as tokenizer.json",
            hint="use an HF checkpoint directory as the source, or keep using the GGUF's own vocabulary",
        )
    backend = parts.backend
    tk = Tokenizer.from_str(source_tk.to_str())
    bos = backend.bos_id if backend.add_bos else None
    eos = backend.eos_id if backend.add_eos else None
    if bos is not None or eos is not None:
        tk.post_processor = _post_processor(tk, bos, eos)
    tk.save(str(outdir / "tokenizer.json"))
    config: dict[str, Any] = {f"{k}_token": v for k, v in parts.tokens.items()}
    config.update(
        tokenizer_class="PreTrainedTokenizerFast",
        add_bos_token=bool(backend.add_bos),
        add_eos_token=bool(backend.add_eos),
        clean_up_tokenization_spaces=False,
    )
    templates = parts.chat_templates
    if isinstance(templates, str) or (templates and list(templates) == ["default"]):
        config["chat_template"] = templates if isinstance(templates, str) else templates["default"]
    elif templates:  # HF's list-of-named form keeps every template (default, tool_use, ...)
        config["chat_template"] = [{"name": k, "template": v} for k, v in templates.items()]
    _write_json(outdir / "tokenizer_config.json", config)
    written = ["tokenizer.json", "tokenizer_config.json"]
    stop = set(parts.extra_eos_ids) | ({parts.ids["eos"]} if "eos" in parts.ids else set())
    if stop - {parts.ids.get("eos")}:
        _write_json(outdir / "generation_config.json", {"eos_token_id": sorted(stop)})
        written.append("generation_config.json")
    return written


def _post_processor(tk: Any, bos: int | None, eos: int | None) -> Any:
    """BOS/EOS around one text (and each of a pair), as transformers' Llama fast tokenizer builds it."""
    from tokenizers import processors

    first = [tk.id_to_token(bos)] if bos is not None else []
    last = [tk.id_to_token(eos)] if eos is not None else []
    single = " ".join([*first, "$A", *last])
    pair = " ".join([single, *(f"{t}:1" for t in first), "$B:1", *(f"{t}:1" for t in last)])
    specials = {tk.id_to_token(i): i for i in (bos, eos) if i is not None}
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(specials.items()))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
