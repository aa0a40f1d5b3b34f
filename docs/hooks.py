"""MkDocs hooks (mkdocs.yml `hooks:`): the pages generated from the code, so that they cannot go stale.

- `api.md`: the API reference, one mkdocstrings entry per name of `refnet_jax.__all__`, resolved through the
  `_API` table of `refnet_jax/__init__.py` to the module that defines it (a name added there appears here).
- `fusions.md`: the fusion modules that `config.model.fusion.kind` can name, from the fusion registry.
- `benchmarks-scripts.md`: benchmarks/README.md, which lives beside the scripts it describes (a page's link
  to `../benchmarks/README.md` is pointed at it).
- In `architecture.md`, the line `<!-- layering -->` becomes a table of which part of the package imports
  which, read from the source.

`python docs/hooks.py PAGE` prints one generated page (`api.md`, `fusions.md`, `layering`), for a look without
building the site.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = 'refnet_jax'
LAYERING_MARK = '<!-- layering -->'
# Links from docs/ to files outside it (right where the pages are read in the repository) -> their generated
# page on the site.
OUTSIDE_LINKS = {'../benchmarks/README.md': 'benchmarks-scripts.md'}


def _api_entries() -> list[tuple[str, str, str]]:
    """(public name, defining module, name there) for each name of `refnet_jax.__all__`, in `_API` order."""
    package = importlib.import_module(PACKAGE)
    entries = []
    for name in package._API:  # the order of the table: grouped by what a user composes
        module, _, attr = package._API[name].partition(':')
        entries.append((name, module, attr or name))
    missing = sorted(set(package.__all__) - {name for name, _, _ in entries})
    if missing:
        raise ValueError(f'refnet_jax.__all__ names {missing}, which the _API table does not resolve')
    return entries


def _summary(module: str) -> str:
    """The first line of a module's docstring, read from its source (the module itself is not run)."""
    spec = importlib.util.find_spec(module)
    doc = ast.get_docstring(ast.parse(pathlib.Path(spec.origin).read_text())) or ''
    return doc.split('\n', 1)[0].strip()


def api_page() -> str:
    """The API reference: every public name with its docstring and signature, grouped by defining module."""
    lines = [
        '# API reference',
        '',
        '`import refnet_jax` gives the names below (`refnet_jax.__all__`); each is defined in the module named',
        'with it and imported when first used. Everything else in the package is internal, and its path may',
        'change. This page is generated from the docstrings: `python -c "import refnet_jax; '
        'print(refnet_jax.__all__)"` lists the same names.',
        '',
    ]
    current = None
    for name, module, attr in _api_entries():
        if module != current:
            current = module
            lines += [f'## `{module}`', '', _summary(module), '']
        lines += [
            f'::: {module}.{attr}',
            '    options:',
            f'      heading: "refnet_jax.{name}"',
            f'      toc_label: "{name}"',
            '      heading_level: 3',
            '',
        ]
        if attr != name:
            lines += [f'`refnet_jax.{name}` is `{module}.{attr}`.', '']
    return '\n'.join(lines)


def _fusion_rows() -> list[tuple[str, str, str, str]]:
    """(name, class path, what it takes, one-line description) of every registered fusion module."""
    fusions = importlib.import_module(f'{PACKAGE}.models.fusions')
    return [(f.kind, f.path, f.inputs, f.description) for f in fusions.describe()]


def fusions_page() -> str:
    """The table of fusion modules, generated from the registry."""
    lines = [
        '# Fusion modules',
        '',
        'The fusion modules that `config.model.fusion.kind` names (`--config.model.fusion.kind=NAME`, or',
        '`configs/<dataset>.py:fusion=NAME`). The other fields of `config.model.fusion` are the fields of the',
        'module (their defaults are the dataclass defaults). This list is generated from the registry; a module',
        'of your own is named by `FILE.py:Class` or `package.module:Class` instead',
        '([Your own encoder or fusion module](how-to/own-modules.md)).',
        '',
        'A fusion takes `pooled` inputs, one vector per modality {m: (B, D_m)}, or `tokens`, every modality as',
        'tokens with their mask.',
        '',
        '| name | module | takes | what it does |',
        '|---|---|---|---|',
    ]
    for name, path, inputs, description in _fusion_rows():
        lines.append(f'| `{name}` | `{path}` | {inputs} | {description.replace("|", "&#124;")} |')
    return '\n'.join(lines) + '\n'


def _part(module: str) -> str:
    """The part of the package a module belongs to: a subpackage (`refnet_jax.models`) or a top-level module."""
    parts = module.split('.')
    return '.'.join(parts[:2]) if len(parts) > 1 else module


def imports_by_part() -> dict[str, set[str]]:
    """{part: the other parts it imports}, from every module's import statements (including those inside
    functions, which are imports too)."""
    edges: dict[str, set[str]] = {}
    for path in sorted((ROOT / PACKAGE).rglob('*.py')):
        module = '.'.join(path.relative_to(ROOT).with_suffix('').parts).removesuffix('.__init__')
        source = _part(module)
        targets = edges.setdefault(source, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith(PACKAGE + '.') and _part(name) != source:
                    targets.add(_part(name))
    # `from refnet_jax.models import fusion` names the subpackage; `from refnet_jax import losses` the module
    known = set(edges)
    return {part: {t for t in targets if t in known} for part, targets in edges.items() if part != PACKAGE}


def layering_table() -> str:
    """A markdown table: each part of the package and the parts it imports."""
    edges = imports_by_part()
    rows = ['| part | imports |', '|---|---|']
    for part in sorted(edges, key=lambda p: (len(_closure(edges, p)), p)):
        imported = ', '.join(f'`{t}`' for t in sorted(edges[part])) or '(nothing of the package)'
        rows.append(f'| `{part}` | {imported} |')
    return '\n'.join(rows)


def _closure(edges: dict[str, set[str]], part: str) -> set[str]:
    seen: set[str] = set()
    todo = [part]
    while todo:
        for t in edges.get(todo.pop(), ()):
            if t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


PAGES = {'api.md': api_page, 'fusions.md': fusions_page}


def _benchmarks_page() -> str:
    return (ROOT / 'benchmarks' / 'README.md').read_text()


# --- mkdocs hooks ---


def on_startup(command, dirty):  # mkdocs calls hooks by these names
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # the package and configs/ as the build's working tree has them


def on_files(files, config):
    from mkdocs.structure.files import File

    for uri, make in {**PAGES, 'benchmarks-scripts.md': _benchmarks_page}.items():
        files.append(File.generated(config, uri, content=make()))
    return files


def on_page_markdown(markdown, page, config, files):
    if LAYERING_MARK in markdown:
        markdown = markdown.replace(LAYERING_MARK, layering_table())
    for outside, generated in OUTSIDE_LINKS.items():
        markdown = markdown.replace(f']({outside})', f']({generated})')
    return markdown


if __name__ == '__main__':
    sys.path.insert(0, str(ROOT))
    page = sys.argv[1] if len(sys.argv) > 1 else 'api.md'
    print(layering_table() if page == 'layering' else PAGES[page]())
