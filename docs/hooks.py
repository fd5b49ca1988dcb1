"""MkDocs hooks: pages whose content is generated from the code when the site is built."""

from __future__ import annotations

from typing import Any

CONFIG_REFERENCE_MARKER = "<!-- config-reference -->"
"""Replaced, in docs/configuration.md, by the reference generated from configs/*.yaml and their schemas."""
FEATURES_MARKER = "<!-- features-reference -->"
"""Replaced by the table of the aggregator's features (aggregation.features.features_markdown)."""


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """Fill the generated parts of a page."""
    if CONFIG_REFERENCE_MARKER in markdown:
        from data_prep.runs.config_reference import config_reference_markdown

        markdown = markdown.replace(CONFIG_REFERENCE_MARKER, config_reference_markdown())
    if FEATURES_MARKER in markdown:
        from aggregation.features import features_markdown

        markdown = markdown.replace(FEATURES_MARKER, features_markdown())
    return markdown
