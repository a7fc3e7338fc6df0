"""Griffe extension of the docs build: Sphinx cross-reference roles in docstrings as links.

The docstrings name other objects the way Python's own documentation does
(``:class:`~cacheroute.tree.Tree```, ``:meth:`match```); mkdocstrings renders Markdown, in
which such a role is literal text. This rewrites each one into an autorefs link,
``[`Tree`][cacheroute.tree.Tree]``, resolved against the rendered reference (scoped: a bare
``match`` is looked up from the documented object outwards). A leading ``~`` shows the last
component only and ``text <target>`` shows ``text``, as in Sphinx. Loaded from
``mkdocs.yml``; the package does not import it.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:meth|class|func|attr|data|mod|exc|obj):`(~?)([^`]+)`")
_TITLED = re.compile(r"(.+?)\s*<([^<>]+)>")


def _link(m: re.Match[str]) -> str:
    short, body = m.group(1), m.group(2).strip()
    titled = _TITLED.fullmatch(body)  # `text <target>`
    if titled:
        return f"[`{titled.group(1)}`][{titled.group(2)}]"
    target = body.removesuffix("()")
    text = target.rsplit(".", 1)[-1] if short else target
    return f"[`{text}`][{target}]"


class SphinxRoles(griffe.Extension):
    """Rewrites the roles of every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        doc = obj.docstring
        if doc is not None and ":`" in doc.value:
            doc.value = _ROLE.sub(_link, doc.value)
