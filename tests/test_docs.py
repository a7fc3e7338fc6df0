"""The docs cannot silently go stale.

* every public name (the ``__all__`` of each public module) has a ``### name`` heading in
  docs/api.md, and the signatures and dataclass defaults written there match the code;
* mkdocs.yml's nav and docs/ agree: every nav page exists, every page is in the nav, and
  relative links point at files inside docs/;
* the README's example runs and prints a worker URL; the Python blocks of the concept
  pages compile.

mkdocs itself is not needed: CI builds the site with ``mkdocs build --strict``.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib
import inspect
import io
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "api.md"

# Every module whose __all__ is public API (cacheroute.testing needs hypothesis, which
# the ``test`` extra that provides pytest also installs).
PUBLIC_MODULES = [
    "cacheroute",
    "cacheroute.worker",
    "cacheroute.lease",
    "cacheroute.tree",
    "cacheroute.testing",
    "cacheroute.cli",
    "cacheroute.policies",
    "cacheroute.policies.base",
    "cacheroute.policies.registry",
    "cacheroute.policies.cache_aware",
    "cacheroute.policies.pair",
    "cacheroute.policies.power_of_two",
    "cacheroute.policies.random",
    "cacheroute.policies.round_robin",
    "cacheroute.policies.shortest_queue",
    "cacheroute.sim",
    "cacheroute.sim.cli",
    "cacheroute.sim.engine",
    "cacheroute.sim.metrics",
    "cacheroute.sim.progress",
    "cacheroute.sim.report",
    "cacheroute.sim.request",
    "cacheroute.sim.simulator",
    "cacheroute.sim.specs",
    "cacheroute.sim.traces",
    "cacheroute.sim.workloads",
]

_MODULE_HEADING = re.compile(r"^## `?(cacheroute[\w.]*)`?\s*$")
_NAME_HEADING = re.compile(r"^### `?([A-Za-z_]\w*)`?\s*$")


@dataclasses.dataclass
class _Section:
    module: str  # the "## cacheroute.x" section the heading is in
    block: str = ""  # the first python block under the heading


def _api_sections() -> dict[str, _Section]:
    sections: dict[str, _Section] = {}
    module = ""
    current: _Section | None = None
    fence: str | None = None  # language of the open code block
    lines: list[str] = []
    for line in API.read_text(encoding="utf-8").splitlines():
        if fence is not None:
            if line.startswith("```"):
                if fence == "python" and current is not None and not current.block:
                    current.block = "\n".join(lines)
                fence = None
            else:
                lines.append(line)
        elif line.startswith("```"):
            fence, lines = line[3:].strip(), []
        elif m := _MODULE_HEADING.match(line):
            module, current = m.group(1), None
        elif m := _NAME_HEADING.match(line):
            name = m.group(1)
            assert name not in sections, f"docs/api.md: two headings for {name!r}"
            current = sections[name] = _Section(module)
    return sections


def _public_names() -> list[tuple[str, str, Any]]:
    out = []
    for mod_name in PUBLIC_MODULES:
        module = importlib.import_module(mod_name)
        out.extend((mod_name, name, getattr(module, name)) for name in module.__all__)
    return out


def _stub(block: str) -> str:
    """Make a documented signature listing valid Python: ``def f(...) -> T`` gets ``: ...``."""
    out = []
    depth = 0
    in_sig = False
    for line in block.splitlines():
        code = line.split("  #", 1)[0].rstrip()
        if re.match(r"\s*(async\s+)?(def|class)\s", code):
            in_sig = True
        depth += code.count("(") + code.count("[") - code.count(")") - code.count("]")
        if in_sig and depth == 0:
            in_sig = False
            if not code.endswith(":") and not code.endswith(": ..."):
                line = code + ": ..."
        out.append(line)
    return "\n".join(out)


# --------------------------------------------------------------------------- api.md


def test_public_module_list_is_complete() -> None:
    """A new public module with an ``__all__`` must be listed here (and so documented)."""
    found = set()
    for path in (ROOT / "cacheroute").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if any(p.startswith("_") for p in parts):
            continue
        if re.search(r"^__all__\s*[:=]", path.read_text(encoding="utf-8"), re.M):
            found.add(".".join(parts))
    assert found <= set(PUBLIC_MODULES), sorted(found - set(PUBLIC_MODULES))


def test_every_public_name_has_a_heading_in_api_md() -> None:
    sections = _api_sections()
    missing = [f"{mod}.{name}" for mod, name, _ in _public_names() if name not in sections]
    assert not missing, f"docs/api.md has no '### name' heading for: {', '.join(missing)}"


def test_each_name_is_documented_under_its_defining_module() -> None:
    sections = _api_sections()
    wrong = []
    for _, name, obj in _public_names():
        home = getattr(obj, "__module__", None) if callable(obj) else None
        if not home or not home.startswith("cacheroute") or "._" in home:
            continue  # constants, aliases, __version__: placed by hand
        if name in sections and sections[name].module != home:
            wrong.append(f"{name}: documented under {sections[name].module!r}, defined in {home}")
    assert not wrong, "\n".join(wrong)


def test_api_md_python_blocks_parse() -> None:
    text = API.read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert len(blocks) > 50
    for k, block in enumerate(blocks):
        try:
            ast.parse(_stub(block))
        except SyntaxError as exc:  # pragma: no cover - the message is the point
            pytest.fail(f"docs/api.md python block {k} does not parse: {exc}\n{block}")


_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: "positional",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
    inspect.Parameter.VAR_POSITIONAL: "*args",
    inspect.Parameter.KEYWORD_ONLY: "keyword-only",
    inspect.Parameter.VAR_KEYWORD: "**kwargs",
}


def _documented(fn: ast.FunctionDef, namespace: dict[str, Any]) -> list[tuple[str, str, Any]]:
    a = fn.args
    positional = a.posonlyargs + a.args
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(a.defaults))
    defaults += a.defaults
    params: list[tuple[str, str, ast.expr | None]] = [
        (arg.arg, "positional", d) for arg, d in zip(positional, defaults, strict=True)
    ]
    if a.vararg:
        params.append((a.vararg.arg, "*args", None))
    params += [
        (arg.arg, "keyword-only", d) for arg, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)
    ]
    if a.kwarg:
        params.append((a.kwarg.arg, "**kwargs", None))
    empty = inspect.Parameter.empty
    return [
        (n, k, empty if d is None else eval(ast.unparse(d), namespace))
        for n, k, d in params
        if n not in ("self", "cls")
    ]


def _actual(obj: Any) -> list[tuple[str, str, Any]]:
    params = inspect.signature(obj).parameters.values()
    return [(p.name, _KINDS[p.kind], p.default) for p in params if p.name not in ("self", "cls")]


def _signatures_to_check() -> list[tuple[str, ast.FunctionDef, Any, dict[str, Any]]]:
    """(label, documented def, the real callable, namespace for its defaults)."""
    sections = _api_sections()
    seen: set[str] = set()
    out = []
    for _, name, obj in _public_names():
        if name in seen or name not in sections or not sections[name].block:
            continue
        seen.add(name)
        namespace = dict(vars(importlib.import_module(getattr(obj, "__module__", "cacheroute"))))
        tree = ast.parse(_stub(sections[name].block))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == name:
                out.append((name, node, obj, namespace))
            elif isinstance(node, ast.ClassDef) and node.name == name and inspect.isclass(obj):
                for fn in node.body:
                    if not isinstance(fn, ast.FunctionDef):
                        continue
                    if any(ast.unparse(d) == "property" for d in fn.decorator_list):
                        continue
                    real = obj if fn.name == "__init__" else getattr(obj, fn.name)
                    out.append((f"{name}.{fn.name}", fn, real, namespace))
    return out


def test_documented_signatures_match_the_code() -> None:
    """Every ``def`` in api.md has the code's parameter names, kinds and defaults."""
    checked = _signatures_to_check()
    problems = []
    for label, fn, real, namespace in checked:
        documented, actual = _documented(fn, namespace), _actual(real)
        if documented != actual:
            problems.append(f"{label}:\n  docs: {documented}\n  code: {actual}")
    assert not problems, "docs/api.md signatures differ from the code:\n" + "\n".join(problems)
    assert len(checked) >= 70, f"only {len(checked)} signatures found: is the parser broken?"


def test_documented_dataclass_fields_match_the_code() -> None:
    """``field: type = default`` lines under a dataclass's heading match the dataclass."""
    sections = _api_sections()
    problems = []
    checked = set()
    for _, name, obj in _public_names():
        if not (inspect.isclass(obj) and dataclasses.is_dataclass(obj)) or name in checked:
            continue
        if name not in sections:  # reported by test_every_public_name_has_a_heading_in_api_md
            continue
        checked.add(name)
        namespace = dict(vars(importlib.import_module(obj.__module__)))
        node = ast.parse(_stub(sections[name].block)).body[0]
        assert isinstance(node, ast.ClassDef), name
        documented = {
            st.target.id: st.value
            for st in node.body
            if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)
        }
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if list(documented) != list(fields):
            problems.append(f"{name}: docs list {list(documented)}, code has {list(fields)}")
            continue
        for fname, value in documented.items():
            f = fields[fname]
            if f.default is not dataclasses.MISSING:
                want: Any = f.default
            elif f.default_factory is not dataclasses.MISSING:
                want = f.default_factory()
            else:
                want = dataclasses.MISSING
            got = dataclasses.MISSING if value is None else eval(ast.unparse(value), namespace)
            if got != want:
                problems.append(f"{name}.{fname}: docs say {got!r}, code has {want!r}")
    assert not problems, "\n".join(problems)
    assert len(checked) >= 8, checked


# --------------------------------------------------------------------------- mkdocs.yml


def _nav_pages() -> list[str]:
    """The ``.md`` files in mkdocs.yml's nav (read without a YAML library)."""
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = re.split(r"\n(?=\S)", text.split("\nnav:", 1)[1], maxsplit=1)[0]
    return re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?([\w./-]+\.md)\s*$", nav, re.M)


def test_every_nav_page_exists_and_every_page_is_in_the_nav() -> None:
    nav = _nav_pages()
    assert "index.md" in nav and "api.md" in nav, nav
    assert len(nav) == len(set(nav)), f"a page is listed twice: {nav}"
    missing = [p for p in nav if not (DOCS / p).is_file()]
    assert not missing, f"mkdocs.yml lists pages that do not exist: {missing}"
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert not pages - set(nav), f"pages missing from mkdocs.yml's nav: {sorted(pages - set(nav))}"


def test_mkdocs_yml_needs_only_mkdocs() -> None:
    """The ``docs`` extra is just mkdocs: a built-in theme and no plugins."""
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    theme = re.search(r"^theme:[ \t]*(?:\n[ \t]+name:[ \t]*)?(\S+)", text, re.M)
    assert theme and theme.group(1) in ("mkdocs", "readthedocs"), theme
    assert not re.search(r"^plugins:", text, re.M)


def test_relative_links_point_at_files_inside_docs() -> None:
    """As strict mode requires: a link to a repository file outside docs/ fails the build."""
    link = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
    bad = []
    for page in DOCS.rglob("*.md"):
        text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
        text = re.sub(r"`[^`\n]*`", "", text)
        for m in link.finditer(text):
            target = m.group(1).split("#", 1)[0]
            if not target or re.match(r"[a-z]+:", target):
                continue
            resolved = (page.parent / target).resolve()
            if not resolved.is_file() or DOCS.resolve() not in resolved.parents:
                bad.append(f"docs/{page.relative_to(DOCS)}: {m.group(0)}")
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------- examples


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), re.S | re.M)


def test_readme_example_runs_and_prints_a_worker_url() -> None:
    blocks = _python_blocks(ROOT / "README.md")
    assert blocks, "README.md has no python block"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme"})
    assert re.search(r"forward to http://10\.0\.0\.[12]:8000", out.getvalue()), out.getvalue()


@pytest.mark.parametrize(
    "page", ["index.md", "concepts.md", "policies/index.md", "tree.md", "testing.md"]
)
def test_python_blocks_compile(page: str) -> None:
    blocks = _python_blocks(DOCS / page)
    for k, block in enumerate(blocks):
        compile(block, f"docs/{page}, python block {k}", "exec")
