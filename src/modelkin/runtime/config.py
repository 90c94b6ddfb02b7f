"""Runtime dataclasses: the shared decoder ModelArgs base (HF key names) and SamplingParams."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, TypeVar

from modelkin.errors import ConfigError

log = logging.getLogger(__name__)
A = TypeVar("A", bound="DecoderArgs")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DecoderArgs:
    """Fields every dense decoder config shares; names are the HF config.json keys, verbatim.

    Architecture files subclass this and add their own keys (``attention_bias``, ``bias``, …).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # sizes validate() requires > 0 (MoE configs without dense layers drop intermediate_size)
    positive_keys: ClassVar[tuple[str, ...]] = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
    )
    supported_acts: ClassVar[tuple[str, ...]] = ("silu", "swish")  # hidden_act values the MLP runs

    @classmethod
    def from_hf_config(cls: type[A], config: dict[str, Any]) -> A:
        """Build the args from a config.json dict; unknown keys are ignored (logged at debug).

        Derived values are filled explicitly: ``num_key_value_heads`` defaults to
        ``num_attention_heads`` and ``head_dim`` to ``hidden_size // num_attention_heads``.
        transformers 5 ``rope_parameters`` is read as ``rope_theta`` + ``rope_scaling``.

        Raises:
            ConfigError: a required key is missing or has the wrong type.
        """
        d = normalise_rope_keys(config)
        heads = _require(d, "num_attention_heads", cls)
        if d.get("num_key_value_heads") is None:
            d["num_key_value_heads"] = heads
        if d.get("head_dim") is None:
            d["head_dim"] = _require(d, "hidden_size", cls) // heads
        names = {f.name for f in dataclasses.fields(cls)}
        ignored = sorted(k for k in d if k not in names)
        if ignored:
            log.debug("%s ignores config keys: %s", cls.__qualname__, ", ".join(ignored))
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise ConfigError(
                f"config.json lacks required key(s) {', '.join(missing)} for {d.get('model_type')!r}",
                hint="add them to config.json (see the model's original config)",
            )
        _check_types(cls, kwargs)
        args = cls(**kwargs)
        args.validate()
        return args

    def validate(self) -> None:
        """Check relations between fields; raises ConfigError naming the keys."""
        for key in self.positive_keys:
            if getattr(self, key) <= 0:
                raise ConfigError(
                    f"config.json key {key!r} must be positive, found {getattr(self, key)}",
                    hint="fix config.json",
                )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} is odd; rotary embeddings need an even head_dim",
                              hint="fix head_dim (or hidden_size / num_attention_heads) in config.json")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}",
                hint="fix config.json",
            )
        if self.hidden_act not in self.supported_acts:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported",
                              hint=f"supported: {', '.join(self.supported_acts)}")

    def eos_ids(self) -> set[int]:
        """All EOS ids named by the config (an int or a list)."""
        eos = self.eos_token_id
        if eos is None:
            return set()
        return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


_JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "int": int,
    "float": (int, float),
    "str": str,
    "bool": bool,
    "None": type(None),
    "dict": dict,
    "list": list,
    "tuple": (list, tuple),
}


def _matches(value: Any, annotation: str) -> bool:
    """Whether a JSON value fits a field annotation such as 'int | list[int] | None' (unknown: yes)."""
    for alternative in annotation.split("|"):
        base, _, inner = alternative.strip().partition("[")
        kind = _JSON_TYPES.get(base)
        if kind is None:
            return True
        if isinstance(value, bool) and base in ("int", "float"):
            continue
        if isinstance(value, kind):
            item = _JSON_TYPES.get(inner.split(",")[0].rstrip("]").strip()) if inner else None
            if (
                item is None
                or base == "dict"
                or all(_matches(v, inner.split(",")[0].rstrip("]")) for v in value)
            ):
                return True
    return False


def _check_types(cls: type, kwargs: dict[str, Any]) -> None:
    """Raise ConfigError for a config.json value of the wrong JSON type (before it reaches torch);
    integers given for float fields become floats (rope_theta: 10000)."""
    for field in dataclasses.fields(cls):
        value = kwargs.get(field.name)
        if value is not None and isinstance(field.type, str) and not _matches(value, field.type):
            raise ConfigError(
                f"config.json key {field.name!r} must be {field.type}, found {value!r}"[:300],
                hint="fix config.json",
            )
        if field.type == "float" and isinstance(value, int):
            try:
                kwargs[field.name] = float(value)
            except OverflowError:
                raise ConfigError(f"config.json key {field.name!r} is too large: {value}"[:300],
                                  hint="fix config.json") from None


def normalise_rope_keys(config: dict[str, Any]) -> dict[str, Any]:
    """Copy of ``config`` with transformers-5 ``rope_parameters`` split into rope_theta/rope_scaling."""
    d = dict(config)
    params = d.pop("rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        d.setdefault("rope_theta", params["rope_theta"])
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default" and d.get("rope_scaling") is None:
            d["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return d


def _require(d: dict[str, Any], key: str, cls: type) -> int:
    value = d.get(key)
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(
            f"config.json key {key!r} must be a positive integer, found {value!r} "
            f"(model_type {d.get('model_type')!r})",
            hint="fix config.json",
        )
    return value


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
    """One generation request's sampling and stopping options.

    ``temperature == 0`` means greedy. ``stop`` strings end generation when the decoded text
    contains them (the stop string itself is cut from the returned text).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
