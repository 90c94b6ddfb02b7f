"""manifest.json of an exported directory: which graph is which, their inputs and outputs, and the
model facts an engine needs to feed them (layers, kv heads, head dim, dtype, tokenizer file)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from modelkin.errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT = "modelkin-onnx"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OnnxManifest:
    """What ``modelkin export-onnx`` wrote.

    ``prefill`` has no past inputs; ``decode`` takes past_key_values.N.key/value [B, K, P, Dh] and
    returns present.N.key/value [B, K, P+L, Dh]. Both read ``external_data``. ``io`` maps each
    graph to its inputs and outputs (name, dtype, shape with named dynamic axes).
    """

    model_type: str
    architecture: str
    source: str
    dtype: str
    kv_dtype: str
    logits_dtype: str
    opset: int
    ir_version: int
    exporter: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    sliding_window: int | None
    tokenizer: str | None
    io: dict[str, Any]
    prefill: str = "model.onnx"
    decode: str = "decode.onnx"
    external_data: str = "model.onnx.data"
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    modelkin_version: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, directory: Path) -> None:
        text = json.dumps(self.to_json(), indent=2) + "\n"
        (Path(directory) / MANIFEST).write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> OnnxManifest:
        """Read ``directory/manifest.json``.

        Raises:
            CheckpointError: no manifest, unreadable, or another format or version.
        """
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise CheckpointError(
                f"{directory} is not a modelkin ONNX export (no {MANIFEST})",
                hint="pass the OUTDIR written by `modelkin export-onnx MODEL OUTDIR`",
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path} is unreadable ({err})", hint="re-export the model") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a {FORMAT} manifest", hint="re-export the model")
        if data.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{path} has format version {data.get('format_version')}; this modelkin reads "
                f"version {FORMAT_VERSION}",
                hint="re-export the model with this modelkin",
            )
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(
            f.name for f in dataclasses.fields(cls) if f.name not in data and f.default is dataclasses.MISSING
        )
        if missing:
            raise CheckpointError(f"{path} lacks {', '.join(missing)}", hint="re-export the model")
        return cls(**{k: v for k, v in data.items() if k in names})
