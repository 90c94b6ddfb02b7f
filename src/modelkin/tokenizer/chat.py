"""Chat templates: jinja2 rendering in a locked-down sandbox, plus Pangu's built-in chat format.

Templates come from checkpoints and are untrusted: they render in an ImmutableSandboxedEnvironment in
which any access to an unsafe attribute raises instead of returning an undefined value.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar

import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from modelkin.errors import InputError, TokenizerError
from modelkin.tokenizer.chat_limits import LimitedSandbox, check_namespace_value, render_limited

# Pangu Pro MoE / openPangu-Embedded chat format: [unused9] opens a turn, the
# role name and a full-width colon (U+FF1A) follow, [unused10] closes it; a conversation without a
# system turn gets an empty one. BOS is added by the tokenizer, not by the template.
PANGU_CHAT_TEMPLATE = (
    "{% set roles = {'system': '系统', 'user': '用户', 'assistant': '助手', "
    "'tool': '工具', 'function': '方法'} %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '[unused9]系统：[unused10]' }}{% endif %}"
    "{% if message['role'] not in roles %}"
    "{{ raise_exception('Pangu chat format has no role ' ~ message['role']) }}"
    "{% endif %}"
    "{{ '[unused9]' ~ roles[message['role']] ~ '：' ~ message['content'] ~ '[unused10]' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[unused9]助手：' }}{% endif %}"
)

PANGU_MODEL_TYPES = frozenset({"pangupromoe", "panguembedded", "pangu_pro_moe", "pangu_embedded", "pangumoe"})
PANGU_ARCHITECTURES = frozenset({"PanguProMoEForCausalLM", "PanguEmbeddedForCausalLM"})


# Gemma-3's documented chat format (its tokenizer_config.json, text parts only), for GGUF files that
# carry no template: a system message prefixes the first user turn, the assistant's role is "model",
# every turn ends with <end_of_turn>. The template writes BOS itself.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] ~ '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' ~ role ~ '\n' ~ (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
GEMMA_END_OF_TURN = "<end_of_turn>"


def is_gemma3_config(config: Mapping[str, Any] | None) -> bool:
    """True when a config.json dict describes a Gemma-3 model (text-only or multimodal)."""
    if not config:
        return False
    architectures = config.get("architectures")
    architectures = architectures if isinstance(architectures, list) else []  # hostile configs: any JSON
    return str(config.get("model_type") or "") in ("gemma3", "gemma3_text") or any(
        str(a).startswith("Gemma3") for a in architectures
    )


def is_pangu_config(config: Mapping[str, Any] | None) -> bool:
    """True when a config.json dict describes Pangu Pro MoE or openPangu-Embedded."""
    if not config:
        return False
    model_type = str(config.get("model_type") or "").lower()
    architectures = config.get("architectures") or []
    return model_type in PANGU_MODEL_TYPES or any(a in PANGU_ARCHITECTURES for a in architectures)


class ChatTemplate:
    """One or more named jinja chat templates, compiled lazily in the sandbox.

    Args:
        templates: a template string, or a mapping of name to template (HF's list-of-named form).
        source: where the template came from, for error messages.
    """

    def __init__(self, templates: str | Mapping[str, str], *, source: str):
        self.templates = {"default": templates} if isinstance(templates, str) else dict(templates)
        self.source = source
        self._compiled: dict[str, Any] = {}

    def pick(self, name: str | None, *, tools: Any = None) -> str:
        """The template name to use: the one asked for, else 'tool_use' with tools, else 'default'."""
        if name is not None:
            if name in self.templates:
                return name
            raise InputError(
                f"chat template {name!r} not found in {self.source}",
                hint=f"use one of {sorted(self.templates)}",
            )
        if tools is not None and "tool_use" in self.templates:
            return "tool_use"
        if "default" in self.templates:
            return "default"
        if len(self.templates) == 1:
            return next(iter(self.templates))
        raise InputError(
            f"{self.source} has several chat templates and none is named 'default'",
            hint=f"pass chat_template=<name>, one of {sorted(self.templates)}",
        )

    def render(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool,
        variables: Mapping[str, Any],
        template_name: str | None = None,
        **extra: Any,
    ) -> str:
        """Render ``messages``; extra keyword arguments override ``variables`` (special tokens)."""
        messages = _check_messages(messages)
        name = self.pick(template_name, tools=extra.get("tools"))
        template = self._compile(name)
        context = {"tools": None, "documents": None, **dict(variables), **extra}
        context = {key: _plain(value) for key, value in context.items()}
        try:
            return render_limited(
                template, messages=messages, add_generation_prompt=bool(add_generation_prompt), **context
            )
        except TokenizerError:
            raise
        except Exception as err:  # noqa: BLE001 - jinja2 errors, and whatever a template's own code raises
            raise _template_error(err, self.source) from None

    def _compile(self, name: str) -> Any:
        if name not in self._compiled:
            try:
                self._compiled[name] = _environment().from_string(self.templates[name])
            except Exception as err:  # noqa: BLE001 - jinja2 raises many error types while parsing
                raise TokenizerError(
                    f"chat template {name!r} from {self.source} does not compile: {err}",
                    hint="fix the template text or pass a different chat template",
                ) from None
        return self._compiled[name]


def _template_error(err: Exception, source: str) -> TokenizerError:
    if isinstance(err, SecurityError):
        return TokenizerError(
            f"chat template from {source} tried to leave the sandbox: {err}",
            hint="the template is unsafe; do not use this checkpoint's chat template",
        )
    return TokenizerError(
        f"chat template from {source} failed: {type(err).__name__}: {err}",
        hint="check the messages (roles, order) against what the template accepts",
    )


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("chat messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise InputError(f"chat message {i} is not a dict with a 'role' key: {message!r}")
        # like transformers: drop None values, which many templates would print as 'None'
        out.append(_plain({k: v for k, v in message.items() if v is not None}))
    return out


def _plain(value: Any) -> Any:
    """Rebuild ``value`` from plain JSON types so that templates never see objects with methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


class _StrictSandbox(LimitedSandbox, ImmutableSandboxedEnvironment):
    """Unsafe attribute access raises at once (the stock sandbox returns an undefined value); loops,
    sizes and output are bounded (chat_limits)."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed")


class _SafeNamespace(Namespace):
    """jinja's namespace(), refusing underscore names so templates cannot reach interpreter internals."""

    def __init__(*args: Any, **kwargs: Any):
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for key in attrs:
            _check_public(key)
        Namespace.__init__(self, attrs)

    def __setitem__(self, key: str, value: Any) -> None:
        _check_public(key)
        check_namespace_value(value)
        Namespace.__setitem__(self, key, value)


def _check_public(key: Any) -> None:
    if isinstance(key, str) and key.startswith("_"):
        raise SecurityError(f"namespace attribute {key!r} is not allowed")


class _GenerationTag(jinja2.ext.Extension):
    """Accept transformers' {% generation %}...{% endgeneration %} (assistant-mask marker) as a no-op."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class _TemplateDict:
    """dict() and dict.fromkeys() for templates, without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # transformers' override: no HTML escaping, non-ASCII kept as is
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    """The rendering environment transformers uses (trim/lstrip blocks, loop controls, its helpers)."""
    env = _StrictSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _SafeNamespace
    env.globals["dict"] = _TemplateDict()
    return env
