"""The configuration reference: every key of every stage's YAML with its default, its limits and its meaning.

Generated, so it cannot drift: the keys, defaults and meanings come from the packaged `configs/<stage>.yaml`
(the comment on each key's line), and the types, choices and ranges from the schema that validates them
(`configs.schema.SCHEMAS`). The documentation site calls `config_reference_markdown()` when it is built
(`docs/hooks.py`), and `tests/test_docs.py` checks that every key appears.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from configs.schema import SCHEMAS
from data_prep.runs.config import default_config_path

KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][A-Za-z0-9_]*):(?P<value>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$")
"""A `key: value  # comment` line of a stage YAML (values in these files never hold a `#`)."""
SECTION_INDENT = 0
KEY_INDENT = 2
LIMIT_WORDS: tuple[tuple[str, str], ...] = (
    ("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"),
    ("minItems", "items >="), ("maxItems", "items <="))
"""JSON-schema limits shown in the reference, with the words they are shown with."""


@dataclass(frozen=True)
class KeyDoc:
    """One documented key: its section, name, default as written in the YAML, limits and meaning."""

    stage: str
    section: str
    key: str
    default: str
    limits: str
    meaning: str


def stage_keys(stage: str) -> list[KeyDoc]:
    """Every key of configs/<stage>.yaml in file order, with the schema's limits and the YAML's meaning."""
    properties = _section_properties(stage)
    docs: list[KeyDoc] = []
    section = ""
    for line in _logical_lines(default_config_path(stage).read_text(encoding="utf-8")):
        match = KEY_LINE.match(line)
        if match is None:
            continue
        indent = len(match["indent"])
        if indent == SECTION_INDENT:
            section = match["key"]
        elif indent == KEY_INDENT and section:
            prop = properties.get(section, {}).get(match["key"], {})
            docs.append(KeyDoc(stage, section, match["key"], match["value"].strip(), _limits(prop),
                               (match["comment"] or "").strip()))
    return docs


def _logical_lines(text: str) -> list[str]:
    """The YAML's lines with a value whose brackets span several lines joined into one (comment of the last)."""
    out: list[str] = []
    pending = ""
    for line in text.splitlines():
        if pending:
            value, _, comment = line.partition("#")
            pending += " " + value.strip()
            if _balanced(pending):
                out.append(pending + (f"  # {comment.strip()}" if comment else ""))
                pending = ""
            continue
        value = line.partition("#")[0]
        if KEY_LINE.match(line) and not _balanced(value):
            pending = value.rstrip()
        else:
            out.append(line)
    return out


def _balanced(text: str) -> bool:
    return text.count("[") == text.count("]") and text.count("{") == text.count("}")


def config_reference_markdown(stages: Iterable[str] | None = None) -> str:
    """The reference as Markdown: one heading per stage, one table per section."""
    out: list[str] = []
    for stage in stages if stages is not None else SCHEMAS:
        out.append(f"## `{stage}` (`configs/{stage}.yaml`)")
        section = None
        for doc in stage_keys(stage):
            if doc.section != section:
                section = doc.section
                out.append(f"\n### `{stage}`: `{section}`\n\n| key | default | accepts | meaning |\n|---|---|---|---|")
            out.append(f"| `{doc.section}.{doc.key}` | `{_cell(doc.default)}` | {_cell(doc.limits)} | "
                       f"{_cell(doc.meaning)} |")
        out.append("")
    return "\n".join(out)


def _section_properties(stage: str) -> dict[str, dict[str, Any]]:
    """Section -> key -> JSON-schema property of that key (with $refs resolved one level)."""
    schema = SCHEMAS[stage].model_json_schema()
    defs = schema.get("$defs", {})
    out: dict[str, dict[str, Any]] = {}
    for name, prop in schema.get("properties", {}).items():
        ref = _ref_target(prop, defs)
        if ref is not None:
            out[name] = {k: _resolve(v, defs) for k, v in ref.get("properties", {}).items()}
    return out


def _ref_target(prop: Mapping[str, Any], defs: Mapping[str, Any]) -> Mapping[str, Any] | None:
    ref = prop.get("$ref")
    if ref is None:
        for option in prop.get("allOf", []) + prop.get("anyOf", []):
            if "$ref" in option:
                ref = option["$ref"]
                break
    return defs.get(ref.rsplit("/", 1)[-1]) if ref else None


def _resolve(prop: Mapping[str, Any], defs: Mapping[str, Any]) -> dict[str, Any]:
    target = _ref_target(prop, defs)
    return dict(target) if target is not None and "properties" not in target else dict(prop)


def _limits(prop: Mapping[str, Any]) -> str:
    """A short human text of a key's type, choices and range from its JSON-schema property."""
    if not prop:
        return ""
    if "enum" in prop:
        return "one of " + ", ".join(f"`{v}`" for v in prop["enum"])
    if "const" in prop:
        return f"`{prop['const']}`"
    if "anyOf" in prop:
        parts = [_limits(option) for option in prop["anyOf"]]
        return " or ".join(p for p in parts if p)
    kind = prop.get("type", "")
    words = [kind if kind != "null" else "null"] if kind else []
    if prop.get("minItems") is not None and prop.get("minItems") == prop.get("maxItems"):
        prop = {k: v for k, v in prop.items() if k not in ("minItems", "maxItems")} | {"_n": prop["minItems"]}
        words.append(f"of {prop['_n']}")
    words += [f"{word} {prop[name]}" for name, word in LIMIT_WORDS if name in prop]
    if kind == "array" and "items" in prop:
        inner = _limits(prop["items"])
        if inner:
            words.append(f"of {inner}")
    return " ".join(words)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")
