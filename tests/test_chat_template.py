"""Chat templates: the sandbox holds, helpers behave like transformers', named templates resolve."""

from __future__ import annotations

import json

import pytest

from modelkin.errors import InputError, TokenizerError
from modelkin.tokenizer import load_tokenizer, write_tiny_tokenizer
from modelkin.tokenizer.chat import ChatTemplate

USER = [{"role": "user", "content": "hi"}]

ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ joiner.__init__.__globals__['__builtins__']['open']('{marker}', 'w') }}",
    "{{ lipsum.__globals__['os'].popen('touch {marker}').read() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ namespace(__init__=1) }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages[0].update({'role': 'x'}) }}",
    "{{ (messages|first).items().__iter__ }}",
]


@pytest.mark.parametrize("payload", ESCAPES)
def test_sandbox_escapes_raise_and_never_execute(payload, tmp_path):
    marker = tmp_path / "pwned"
    template = ChatTemplate(payload.replace("{marker}", str(marker)), source="evil/tokenizer_config.json")
    with pytest.raises(TokenizerError, match="evil/tokenizer_config.json") as err:
        template.render(USER, add_generation_prompt=True, variables={})
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_helpers_match_transformers_rendering(tmp_path):
    """A template using tojson, namespace, loop controls, strftime_now and indented blocks
    (trim_blocks/lstrip_blocks) renders exactly as transformers renders it."""
    transformers = pytest.importorskip("transformers")
    template = """{%- set ns = namespace(n=0) -%}
{% for message in messages %}
    {% if message.role == 'system' %}
        {% continue %}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
<|im_start|>{{ message.role }} {{ ns.n }}
{{ message.content }}<|im_end|>
{% endfor %}
{% if tools %}
TOOLS {{ tools | tojson }} {{ tools | tojson(indent=2) }}
{% endif %}
{% if strftime_now('%Y') | length == 4 %}YEAR{% endif %}
{{ bos_token }}|{{ eos_token }}|{{ custom | default('none') }}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
    write_tiny_tokenizer(tmp_path, "bpe", vocab_size=400)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    tok = load_tokenizer(None, tmp_path)
    tools = [{"name": "météo", "description": "<b>weather</b> & more", "parameters": {"city": "string"}}]
    messages = [
        {"role": "system", "content": "skip me"},
        {"role": "user", "content": "Ça va? 你好"},
        {"role": "assistant", "content": "oui", "tool_calls": None},
    ]
    for gen in (True, False):
        for extra in ({}, {"tools": tools, "custom": "x"}):
            ours = tok.apply_chat_template(messages, add_generation_prompt=gen, **extra)
            theirs = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **extra)
            assert ours == theirs
    assert '"météo"' in ours and "<b>weather</b> & more" in ours


def test_raise_exception_and_bad_messages():
    template = ChatTemplate(
        "{% if messages[0].role != 'user' %}{{ raise_exception('roles must alternate') }}{% endif %}ok",
        source="t.json",
    )
    assert template.render(USER, add_generation_prompt=False, variables={}) == "ok"
    with pytest.raises(
        TokenizerError, match="chat template from t.json failed: TemplateError: roles must alternate"
    ):
        template.render([{"role": "assistant", "content": "x"}], add_generation_prompt=False, variables={})
    with pytest.raises(InputError, match="non-empty list"):
        template.render([], add_generation_prompt=False, variables={})
    with pytest.raises(InputError, match="chat message 1 is not a dict with a 'role' key"):
        template.render([*USER, "hello"], add_generation_prompt=False, variables={})
    with pytest.raises(TokenizerError, match="does not compile"):
        ChatTemplate("{% for %}", source="t.json").render(USER, add_generation_prompt=False, variables={})


def test_named_templates_and_generation_tag(tmp_path):
    write_tiny_tokenizer(tmp_path, "bpe", vocab_size=400)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "default", "template": "D{% generation %}{{ messages[-1].content }}{% endgeneration %}"},
        {"name": "tool_use", "template": "T{{ tools | length }}"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(None, tmp_path)
    assert tok.apply_chat_template(USER) == "Dhi"
    assert tok.apply_chat_template(USER, tools=[{"name": "a"}, {"name": "b"}]) == "T2"
    assert tok.apply_chat_template(USER, chat_template="tool_use", tools=[]) == "T0"
    assert tok.apply_chat_template(USER, chat_template="inline {{ messages | length }}") == "inline 1"
    (tmp_path / "chat_template.jinja").write_text(
        "J{{ messages[0].content }}"
    )  # the file wins, as in transformers
    assert load_tokenizer(None, tmp_path).apply_chat_template(USER) == "Jhi"


def test_no_chat_template_is_a_clear_error(tmp_path):
    write_tiny_tokenizer(tmp_path, "sentencepiece", vocab_size=500)
    tok = load_tokenizer(None, tmp_path)
    assert not tok.has_chat_template
    with pytest.raises(TokenizerError, match="tokenizer.model has no chat template"):
        tok.apply_chat_template(USER)
