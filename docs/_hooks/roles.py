"""Docs build hook: render reST cross-reference roles in docstrings as plain code.

Docstrings use ``:class:`Name``` roles (they read well in ``help()``); mkdocstrings' numpy
style shows them literally, so the role prefix is dropped from the rendered HTML.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):(<code>)~?(?:[\w.]+\.)?")


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub(r"\1", html)
