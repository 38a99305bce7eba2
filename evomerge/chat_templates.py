"""Chat templates a recipe can name (``tokenizer: {chat_template: chatml}``), the same names mergekit
0.1.5 ships: ``chatml``, ``llama3``, ``alpaca``, ``mistral`` and ``exaone``. The Jinja text here is
evomerge's own rendering of each public conversation format. A recipe may also give a literal
Jinja template, or ``auto``: the template most of the recipe's models carry (ties: the first met,
in the recipe's order of models).

The output's template is written as ``chat_template.jinja`` beside the tokenizer, which
transformers 5 prefers over a ``chat_template`` entry of ``tokenizer_config.json`` (that entry is
removed so the folder holds one template).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

TEMPLATES: dict[str, str] = {
    # <|im_start|>role\ncontent<|im_end|>\n per message
    "chatml": (
        "{%- for m in messages -%}"
        "{{ '<|im_start|>' ~ m['role'] ~ '\\n' ~ m['content'] ~ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    ),
    # BOS, then a header per message, the body trimmed, each turn closed by <|eot_id|>
    "llama3": (
        "{{- bos_token -}}"
        "{%- for m in messages -%}"
        "{{ '<|start_header_id|>' ~ m['role'] ~ '<|end_header_id|>\\n\\n' ~ (m['content'] | trim) ~ '<|eot_id|>' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
    ),
    # the last system message as a preamble, then ### Instruction / ### Input / ### Response blocks
    # separated by blank lines
    "alpaca": (
        "{%- set heads = {'user': 'Instruction', 'user_context': 'Input', 'assistant': 'Response'} -%}"
        "{%- set sys = messages | selectattr('role', 'equalto', 'system') | list -%}"
        "{%- set turns = messages | selectattr('role', 'in', heads) | list -%}"
        "{%- set ns = namespace(text=(sys[-1]['content'] | trim) if sys else '') -%}"
        "{%- for m in turns -%}"
        "{%- set ns.text = (ns.text ~ '\\n\\n' if ns.text else '') ~ '### ' ~ heads[m['role']] ~ ':\\n' "
        "~ (m['content'] | trim) -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt and (not turns or turns[-1]['role'] != 'assistant') -%}"
        "{%- set ns.text = (ns.text ~ '\\n\\n' if ns.text else '') ~ '### Response:\\n' -%}"
        "{%- endif -%}"
        "{{ ns.text }}"
    ),
    # BOS, then [INST] user [/INST] answer</s> pairs; an opening system message joins the first user turn
    "mistral": (
        "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none -%}"
        "{%- set turns = messages[1:] if system is not none else messages -%}"
        "{{- bos_token -}}"
        "{%- for m in turns -%}"
        "{%- set user_turn = loop.index0 % 2 == 0 -%}"
        "{%- if (m['role'] == 'user') != user_turn -%}"
        "{{- raise_exception('mistral chat: turns must alternate user / assistant (after one optional "
        "system message)') -}}"
        "{%- elif m['role'] == 'user' -%}"
        "{%- set text = (system ~ '\\n\\n' ~ m['content']) if loop.first and system is not none else m['content'] -%}"
        "{{ '[INST] ' ~ text ~ ' [/INST]' }}"
        "{%- else -%}"
        "{{ ' ' ~ m['content'] ~ eos_token }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    # [|role|]content; a user turn ends with a newline, every other with [|endofturn|] and a newline;
    # an empty system turn opens a chat that has none
    "exaone": (
        "{%- if messages and messages[0]['role'] != 'system' -%}{{ '[|system|][|endofturn|]\\n' }}{%- endif -%}"
        "{%- for m in messages -%}"
        "{{ '[|' ~ m['role'] ~ '|]' ~ m['content'] ~ ('\\n' if m['role'] == 'user' else '[|endofturn|]\\n') }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '[|assistant|]' }}{%- endif -%}"
    ),
}
AUTO = "auto"


def check_template(value: str) -> None:
    """ValueError unless ``value`` is ``auto``, a named template or Jinja text that compiles."""
    if value == AUTO or value in TEMPLATES:
        return
    if "{{" not in value and "{%" not in value:
        raise ValueError(f"chat_template {value[:60]!r} is neither a known name ({', '.join(TEMPLATES)}, auto) nor "
                         f"a Jinja template (no '{{{{' or '{{%')")
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(value)
    except TemplateSyntaxError as err:
        raise ValueError(f"chat_template is not valid Jinja (line {err.lineno}: {err.message})") from None


def model_template(folder: str | Path) -> str | None:
    """The default chat template stored with the tokenizer in ``folder`` (``chat_template.jinja``,
    else ``tokenizer_config.json``'s ``chat_template``), stripped; None when it has none."""
    folder = Path(folder)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8").strip() or None
    cfg = folder / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        value = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError):
        return None
    if isinstance(value, list):  # [{name, template}, ...]: the default one
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    return value.strip() if isinstance(value, str) and value.strip() else None


def resolve_template(value: str | None, folders: list[str | Path]) -> str | None:
    """The template text ``value`` stands for: a named template's text, the most common template of
    ``folders`` for ``auto`` (None when none has one), a literal template unchanged."""
    if value is None:
        return None
    if value == AUTO:
        found = [t for t in (model_template(f) for f in folders) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    return TEMPLATES.get(value, value)
