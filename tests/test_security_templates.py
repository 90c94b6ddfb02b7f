"""Chat templates from checkpoints are untrusted: escape attempts raise TokenizerError with no side
effect (through tokenizer files, modelkin.load(...).generate(chat=True) and `modelkin run --chat`), and
resource bombs stop fast with bounded memory."""

from __future__ import annotations

import json

import pytest

import modelkin
from modelkin.errors import TokenizerError
from modelkin.tokenizer import load_tokenizer, write_tiny_tokenizer
from tests.conftest import run_cli
from tests.fuzz.harness import run_case

USER = [{"role": "user", "content": "hi"}]
ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}",
    "{{ self.__init__.__globals__ }}",
    "{% set x = namespace() %}{{ x.__class__ }}",
    "{{ messages.append(1) }}",
    "{{ lipsum.__globals__['os'].popen('touch {marker}').read() }}",
    "{{ joiner.__init__.__globals__.__builtins__.open('{marker}', 'w') }}",
    "{{ namespace.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__.os.system('touch {marker}') }}",
    "{{ dict.__call__.__globals__ }}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{{ (messages | first).clear() }}",
    "{% set ns = namespace() %}{% set ns._hidden = 1 %}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ range.__self__.__import__('os').system('touch {marker}') }}",
    "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{{ c }}{% endfor %}",
]
BOMBS = [
    "{{ 'a' * 10**9 }}",
    "{{ 'a'.ljust(10**9) }}",
    "{{ 'a' | center(10**9) }}",
    "{{ '%1000000000d' % 1 }}",
    "{{ '{:>1000000000}'.format(1) }}",
    "{{ [1] | batch(10**9, 0) | list }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxx{% endfor %}{% endfor %}",
    "{% set s = 'x' * 1000000 %}{% for i in s %}{% for j in s %}{% endfor %}{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% macro grow(s) %}{{ grow(s ~ s) }}{% endmacro %}{{ grow('ab') }}",
]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer_dir(path, template, where):
    write_tiny_tokenizer(path, "bpe")
    if where == "tokenizer_config.json":
        config = json.loads((path / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    else:
        (path / "chat_template.jinja").write_text(template)
    return path


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja"])
@pytest.mark.parametrize("payload", ESCAPES)
def test_escape_attempts_fail_without_side_effects(tmp_path, payload, where):
    marker = tmp_path / "PWNED"
    tok = load_tokenizer(None, _tokenizer_dir(tmp_path / "tok", payload.replace("{marker}", str(marker)), where))
    with pytest.raises(TokenizerError) as err:
        tok.apply_chat_template(USER)
    assert "\n" not in str(err.value) and where in str(err.value)
    assert not marker.exists()
    assert USER == [{"role": "user", "content": "hi"}]  # the caller's messages are untouched


@pytest.mark.parametrize("bomb", BOMBS)
def test_resource_bombs_stop_fast_with_bounded_memory(tmp_path, bomb):
    tok = load_tokenizer(None, _tokenizer_dir(tmp_path / "tok", bomb, "chat_template.jinja"))
    out = run_case("template", lambda: tok.apply_chat_template(USER))  # <5 s, <200 MB peak growth
    assert isinstance(out, TokenizerError) and "template limits" in str(out), out


def test_benign_template_still_renders_exactly(tmp_path):
    tok = load_tokenizer(None, _tokenizer_dir(tmp_path / "tok", CHATML, "tokenizer_config.json"))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.fixture(scope="module")
def evil_model(tmp_path_factory):
    from modelkin.synth.tiny import make_tiny

    root = tmp_path_factory.mktemp("evil_template")
    marker = root / "PWNED"
    path = make_tiny("qwen2", root / "model", overrides={"hidden_size": 16, "intermediate_size": 32,
                                                         "num_hidden_layers": 1, "num_attention_heads": 2,
                                                         "num_key_value_heads": 1})
    (path / "chat_template.jinja").write_text(ESCAPES[1].replace("{marker}", str(marker)))
    return path, marker


def test_generate_with_chat_refuses(evil_model):
    path, marker = evil_model
    model = modelkin.load(path, device="cpu")
    with pytest.raises(TokenizerError, match="tried to leave the sandbox"):
        model.generate("hi", chat=True, max_new_tokens=2)
    assert model.generate("hi", max_new_tokens=2).tokens  # without --chat the model still runs
    assert not marker.exists()


def test_cli_run_chat_exits_2_with_one_line(evil_model):
    path, marker = evil_model
    proc = run_cli("run", path, "--prompt", "hi", "--chat", "--max-new-tokens", "2", "--device", "cpu",
                   timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "tried to leave the sandbox" in lines[0] and "Traceback" not in proc.stderr
    assert not marker.exists()
