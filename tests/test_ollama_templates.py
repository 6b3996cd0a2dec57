"""Chat templates as Ollama Go templates: the Go-template renderer, the conversion of ChatML and
Llama-3 Jinja templates (every conversation rendered identically), and the Modelfile."""

from __future__ import annotations

from pathlib import Path

import pytest

from openpto.integrations.chat_template import (
    CONVERSATIONS,
    UnconvertibleTemplate,
    convert,
    go_text,
    jinja_text,
    modelfile,
)
from openpto.integrations.gotemplate import TemplateError, render

# The default model's (SmolLM2-135M-Instruct) chat template, as its tokenizer carries it.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Meta-Llama-3-8B-Instruct's chat template.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen2-style ChatML: a default system prompt and tool definitions in the system message.
QWEN_TOOLS = (
    "{%- if tools %}{{- '<|im_start|>system\n' }}{{- 'You may call functions:\n' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{{- '\n' }}{%- endfor %}{{- '<|im_end|>\n' }}"
    "{%- elif messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\nYou are Qwen.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\n' + message.content"
    " + '<|im_end|>\n' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


def _tokenizer(template: str, bos: str = "<s>"):  # type: ignore[no-untyped-def]
    from tests.helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = template
    tok.bos_token = bos
    return tok


# -- the renderer ------------------------------------------------------------------------------


def test_go_renderer_handles_what_ollama_templates_use() -> None:
    data = {"System": "sys", "Messages": [{"Role": "user", "Content": "a"},
                                           {"Role": "assistant", "Content": "b"}],
            "Tools": None}
    source = ('{{- if .System }}S={{ .System }};{{ end }}'
              '{{- range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
              '[{{ $i }}:{{ .Role }}={{ $m.Content }}{{ if $last }}!{{ end }}]'
              '{{- end }} {{ if .Tools }}tools{{ else if eq .System "sys" }}no tools'
              '{{ else }}?{{ end }} {{ and 1 0 }}{{ or 0 "x" }} {{/* a comment */}}'
              '{{ printf "%s-%d" "n" 3 }} {{ json .Messages }}')
    want = ('S=sys;[0:user=a][1:assistant=b!] no tools 0x n-3 '
            '[{"Role":"user","Content":"a"},{"Role":"assistant","Content":"b"}]')
    assert render(source, data) == want
    # Trim markers eat all whitespace on their side, newlines included.
    assert render("a  \n {{- .X -}} \n\t b", {"X": 1}) == "a1b"
    assert render("{{ range .L }}{{ . }}{{ else }}empty{{ end }}", {"L": []}) == "empty"
    assert render("{{ with .M }}{{ .K }}{{ end }}", {"M": {"K": "v"}}) == "v"


@pytest.mark.parametrize("source", ["{{ if .X }}open", "{{ end }}", "{{ frobnicate .X }}x",
                                    "{{ (len .X }}"])
def test_go_renderer_refuses_what_it_cannot_read(source: str) -> None:
    with pytest.raises(TemplateError):
        render(source, {"X": [1]})


# -- the conversion ----------------------------------------------------------------------------


def test_the_default_models_chatml_template_converts_and_renders_identically() -> None:
    tok = _tokenizer(SMOLLM2, bos="<|im_start|>")
    converted = convert(tok)
    assert converted.style == "chatml"
    assert converted.system == ("You are a helpful AI assistant named SmolLM, trained by "
                                "Hugging Face")
    assert converted.stop == ("<|im_start|>", "<|im_end|>")
    assert converted.checked == len(CONVERSATIONS) + 1  # and the one with tool definitions
    assert converted.warnings == ()
    for messages in CONVERSATIONS:
        assert go_text(converted.template, messages, converted.system) == jinja_text(tok, messages)
    # A chat that brings its own system message does not get the default one as well.
    two = go_text(converted.template, CONVERSATIONS[1], converted.system)
    assert two.count("<|im_start|>system") == 1 and "SmolLM" not in two


def test_a_llama3_template_converts_without_its_bos_token() -> None:
    tok = _tokenizer(LLAMA3, bos="<|begin_of_text|>")
    converted = convert(tok)
    assert (converted.style, converted.system) == ("llama3", None)
    assert "<|eot_id|>" in converted.stop
    text = go_text(converted.template, CONVERSATIONS[2], None)
    assert text == jinja_text(tok, CONVERSATIONS[2])
    assert text == ("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nName a colour.<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nBlue.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nAnother one?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_tool_definitions_the_template_renders_are_reported_not_hidden() -> None:
    converted = convert(_tokenizer(QWEN_TOOLS))
    assert converted.system == "You are Qwen."
    assert converted.checked == len(CONVERSATIONS)
    assert len(converted.warnings) == 1 and "tool definitions" in converted.warnings[0]


def test_templates_of_no_known_style_or_that_render_differently_are_refused() -> None:
    with pytest.raises(UnconvertibleTemplate, match="neither ChatML"):
        convert(_tokenizer("{% for m in messages %}### {{ m.role }}: {{ m.content }}\n"
                           "{% endfor %}"))
    # ChatML markers, but the roles are written in capitals: the check catches the difference.
    with pytest.raises(UnconvertibleTemplate, match="renders"):
        convert(_tokenizer("{% for m in messages %}<|im_start|>{{ m.role | upper }}\n"
                           "{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"))
    with pytest.raises(UnconvertibleTemplate, match="no chat template"):
        convert(_tokenizer(""))


def test_the_modelfile_says_everything_the_push_creates() -> None:
    converted = convert(_tokenizer(SMOLLM2, bos="<|im_start|>"))
    text = modelfile("./m.gguf", converted, "Apache-2.0")
    assert text.splitlines()[0] == "FROM ./m.gguf"
    assert f'TEMPLATE """{converted.template}"""' in text
    assert f'SYSTEM """{converted.system}"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'LICENSE """Apache-2.0"""' in text
    draft = modelfile("./m.gguf", None, None, "no known style", "{{ messages }}")
    assert "# The chat template could not be converted: no known style" in draft
    assert "#   {{ messages }}" in draft
    assert not any(line.startswith("TEMPLATE") for line in draft.splitlines())


def test_the_python_renderer_agrees_with_go(tmp_path: Path) -> None:
    """Where Go is installed, Go's own text/template renders the same texts (CI has no Go)."""
    import json
    import os
    import shutil
    import subprocess

    from openpto.integrations.chat_template import STYLES, ollama_messages

    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (apt-get install golang-go)")
    binary = tmp_path / "render"
    env = {**os.environ, "GOCACHE": str(tmp_path / "cache"), "GOPATH": str(tmp_path / "gopath"),
           "GO111MODULE": "off"}
    source = Path(__file__).parent / "go" / "render.go"
    subprocess.run([go, "build", "-o", str(binary), str(source)], env=env, check=True,
                   timeout=300)
    cases = [("{{- range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
              "[{{ $i }}:{{ .Role }}={{ $m.Content }}{{ if $last }}!{{ end }}]{{- end }} "
              '{{ if .Tools }}t{{ else if eq .System "s" }}n{{ else }}?{{ end }} '
              '{{ and 1 0 }}{{ or 0 "x" }} {{ printf "%s-%d" "n" 3 }} {{ json .System }}',
              ollama_messages(CONVERSATIONS[2], None)),
             ("a  \n {{- .X -}} \n\t b", {"X": 1}),
             ("{{ range .L }}{{ . }}{{ else }}empty{{ end }}", {"L": []})]
    cases += [(style.template, ollama_messages(conversation, system))
              for style in STYLES for conversation in CONVERSATIONS
              for system in (None, "A default system prompt.")]
    done = subprocess.run([str(binary)], input=json.dumps(
        [{"template": t, "data": d} for t, d in cases]), capture_output=True, text=True,
        check=True, timeout=60)
    assert json.loads(done.stdout) == [render(t, d) for t, d in cases]
