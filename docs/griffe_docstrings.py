"""Griffe extension of the docs build: docstrings written for ``help()`` and doctest, as
Markdown.

The docstrings name other objects the way Python's own documentation does
(``:class:`~cacheroute.tree.Tree```, ``:meth:`match```); mkdocstrings renders Markdown, in
which such a role is literal text. This rewrites each one into an autorefs link,
``[`Tree`][cacheroute.tree.Tree]``, resolved against the rendered reference (scoped: a bare
``match`` is looked up from the documented object outwards). A leading ``~`` shows the last
component only and ``text <target>`` shows ``text``, as in Sphinx.

Doctest examples (``>>>`` lines and their output, up to a blank line) are fenced as Python
code: in Markdown a ``>>>`` line is a triply nested quote. A paragraph ending in ``::``
before an indented block (reST's literal block) ends in ``:`` and the block is fenced (in
a list item Python-Markdown would take it for more of the item's text). A power written
in prose, ``2**32``, keeps its stars (two in a paragraph would make bold). Loaded from
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


_POWER = re.compile(r"(?<=\w)\*\*(?=\w)")
_CODE_SPAN = re.compile(r"(`+)(?:.+?)\1")


def _escape_powers(text: str) -> str:
    out: list[str] = []
    fenced = False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and "**" in line:
            parts, last = [], 0
            for m in _CODE_SPAN.finditer(line):  # leave code spans as they are
                parts += [_POWER.sub(r"\*\*", line[last : m.start()]), m.group(0)]
                last = m.end()
            line = "".join([*parts, _POWER.sub(r"\*\*", line[last:])])
        out.append(line)
    return "\n".join(out)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _literal_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        if not line.endswith("::") or not line.strip(":"):
            continue
        base = _indent(line)
        text_at = base + (2 if line.lstrip().startswith(("* ", "- ")) else 0)
        j = i
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j == len(lines) or _indent(lines[j]) <= text_at:
            continue  # no literal block follows: a "::" of the prose
        block_at = _indent(lines[j])
        end = j
        while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) >= block_at):
            end += 1
        while not lines[end - 1].strip():
            end -= 1
        out[-1] = line[:-1]
        pad = " " * base
        out += ["", pad + "```"]
        out += [pad + x[block_at:] if x.strip() else "" for x in lines[j:end]]
        out += [pad + "```"]
        i = end
    return "\n".join(out)


def _fence_doctests(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    fenced = False  # inside a fenced block already
    i = 0
    while i < len(lines):
        line = lines[i]
        body = line.lstrip()
        if body.startswith("```"):
            fenced = not fenced
        if fenced or not body.startswith(">>>"):
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(body)]
        if out and out[-1].strip():
            out.append("")
        out.append(indent + "```python")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append(indent + "```")
    return "\n".join(out)


class DocstringsAsMarkdown(griffe.Extension):
    """Rewrites the roles, doctests and literal blocks of every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        doc = obj.docstring
        if doc is None:
            return
        value = doc.value
        if ":`" in value:
            value = _ROLE.sub(_link, value)
        if "::" in value:  # first: a literal block may hold ">>>" lines
            value = _literal_blocks(value)
        if ">>>" in value:
            value = _fence_doctests(value)
        if "**" in value:
            value = _escape_powers(value)
        doc.value = value
