"""The docs: the site builds with warnings as errors, its generated pages follow the code, and the README stays
the front door (at most about 200 lines)."""

import ast
import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import sys
from typing import NamedTuple
from unittest import mock

import pytest

import refnet_jax

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_hooks():
    """docs/hooks.py, the mkdocs hooks that generate pages, as a module."""
    spec = importlib.util.spec_from_file_location('docs_hooks', ROOT / 'docs' / 'hooks.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow(seconds=8)
def test_site_builds_with_warnings_as_errors(tmp_path):
    # mkdocs.yml sets strict: a broken link, a page left out of the navigation or a docstring mkdocstrings
    # cannot render fails the build. The `docs` extra installs mkdocs (the README's test command has it).
    if importlib.util.find_spec('mkdocs') is None:
        pytest.fail("mkdocs is not installed: pip install -c constraints.txt -e '.[docs]'")
    proc = subprocess.run(
        [sys.executable, '-m', 'mkdocs', 'build', '--strict', '--site-dir', str(tmp_path / 'site')],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    api = (tmp_path / 'site' / 'api' / 'index.html').read_text()
    for name in refnet_jax.__all__:
        assert f'refnet_jax.{name}' in api, name
    assert (tmp_path / 'site' / 'fusions' / 'index.html').exists()


def test_api_page_has_every_public_name():
    page = load_hooks().api_page()
    for name in refnet_jax.__all__:
        assert f'heading: "refnet_jax.{name}"' in page, name


def test_fusions_page_lists_the_registry():
    page = load_hooks().fusions_page()
    for name, cls in refnet_jax.FUSIONS.items():
        assert f'| `{name}` | `{cls.__module__}.{cls.__qualname__}` | ' in page, name


def test_layering_table_reads_the_imports():
    edges = load_hooks().imports_by_part()
    assert 'refnet_jax.data' in edges['refnet_jax.models']  # models/ speaks the data contract
    assert not edges['refnet_jax.losses']  # the losses are pure functions of arrays
    assert 'refnet_jax.train' not in edges['refnet_jax.models']


def test_readme_is_the_front_door():
    lines = (ROOT / 'README.md').read_text().splitlines()
    assert len(lines) <= 200, f'README.md has {len(lines)} lines; the how-tos and tables belong in docs/'


def test_no_file_cites_a_design_file_outside_the_repository():
    name = 'DESIGN' + '.md'  # not spelled out, so that this file does not match itself
    tracked = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip('not a git checkout')
    citing = [
        path
        for path in tracked
        if (ROOT / path).is_file() and name in (ROOT / path).read_bytes().decode('utf-8', 'replace')
    ]
    assert not citing, f'{citing} mention {name}; the architecture page is docs/architecture.md'


# --- The code blocks of the docs: a user's commands that have gone stale fail here ---

# Markers whose blocks other tests run as written (they read them through helpers.doc_blocks).
COVERED = {
    'own-modules': 'tests/test_user_modules.py',
    'own-data': 'tests/test_custom_data.py',
    'towers': 'tests/test_pretrained.py',
    'own-data-image-text': 'tests/test_custom_data.py',
    'own-data-text-numbers': 'tests/test_custom_data.py',
    'own-data-regression': 'tests/test_custom_data.py',
    'towers-in-refnet': 'tests/test_towers.py',
}
# Pages whose Python blocks another test runs as written (it reads the page by name).
COVERED_PAGES = {'docs/how-to/own-training-loop.md': 'tests/test_own_loop.py'}
# `<!-- not-run: why -->` on the line before a Python block: it needs what a test cannot have (a GPU, a
# dataset that cannot be had offline, a pod), and says so where a reader sees it.
NOT_RUN = re.compile(r'<!-- not-run: (.+?) -->')
MARKER = re.compile(r'<!-- ([\w-]+):(begin|end) -->')
FENCE = re.compile(r'^```(\w*)\n(.*?)^```', flags=re.S | re.M)
PAGES = sorted(
    [p.relative_to(ROOT).as_posix() for p in (ROOT / 'docs').rglob('*.md')]
    + ['README.md', 'benchmarks/README.md']
)


class Block(NamedTuple):
    page: str
    line: int
    lang: str
    code: str
    markers: tuple[str, ...]  # the begin/end markers it sits between
    not_run: str | None  # the reason given on the line before it, if any

    def where(self) -> str:
        return f'{self.page}:{self.line}'


def blocks(page: str) -> list[Block]:
    """Every fenced code block of `page` (a path from the repository root)."""
    text = (ROOT / page).read_text()
    out = []
    for match in FENCE.finditer(text):
        before = text[: match.start()]
        open_markers = []
        for name, edge in MARKER.findall(before):
            if edge == 'begin':
                open_markers.append(name)
            elif name in open_markers:
                open_markers.remove(name)
        previous = before.rstrip('\n').rsplit('\n', 1)[-1]
        reason = NOT_RUN.search(previous)
        out.append(
            Block(
                page,
                before.count('\n') + 1,
                match.group(1),
                match.group(2),
                tuple(open_markers),
                reason.group(1) if reason else None,
            )
        )
    return out


def test_covered_markers_are_read_by_their_tests():
    for marker, test_file in COVERED.items():
        assert f"'{marker}'" in (ROOT / test_file).read_text(), (
            f'{test_file} no longer reads <!-- {marker} -->'
        )
        assert any(marker in b.markers for page in PAGES for b in blocks(page)), f'no <!-- {marker} --> block'


def test_every_code_block_names_its_language():
    unnamed = [b.where() for page in PAGES for b in blocks(page) if not b.lang]
    assert not unnamed, f'code blocks without a language (```bash, ```python, ```text): {unnamed}'


# Shell commands: parsed, not run. What each python command would read is loaded and checked instead.

SEPARATORS = {';', '&', '&&', '|', '||', '(', ')', 'do', 'done', 'then', 'fi', 'wait'}


def shell_words(code: str) -> list[str]:
    """The words of a shell block (continuations joined, comments dropped), separators as their own words,
    with the block's own variables (`NAME="..."`, `for NAME in A B`) substituted: a loop variable takes its
    first value."""

    def split(text):
        lexer = shlex.shlex(text, posix=True, punctuation_chars=';&|()')
        lexer.whitespace_split = True
        lexer.commenters = '#'
        return list(lexer)

    code = code.replace('\\\n', ' ')  # continuation lines
    variables = {}
    words = split(code)
    for i, word in enumerate(words):
        if re.fullmatch(r'[A-Za-z_]\w*=.*', word) and (i == 0 or words[i - 1] in SEPARATORS | {'\n'}):
            name, _, value = word.partition('=')
            variables.setdefault(name, value)
        if word == 'for' and i + 3 < len(words) and words[i + 2] == 'in':
            variables.setdefault(words[i + 1], words[i + 3])
    for name, value in variables.items():
        code = re.sub(rf'\$\{{{name}\}}|\${name}\b', lambda _, v=value: v, code)
    return [w for line in code.split('\n') for w in split(line) + ['\n']]


def commands(code: str) -> list[list[str]]:
    """The simple commands of a shell block, each a list of words, without leading `VAR=value` settings;
    a quoted command line inside an argument (`ssh ... --command "cd x && python train.py ..."`) counts too."""
    out, current = [], []
    for word in shell_words(code) + ['\n']:
        if word in SEPARATORS or word == '\n':
            if current:
                out.append(current)
            current = []
        elif not current and re.fullmatch(r'[A-Za-z_]\w*=.*', word):
            continue
        else:
            current.append(word)
            if ' ' in word and re.search(r'\bpython3? \S+', word):
                out.extend(commands(word))
    return out


def defined_flags(script: pathlib.Path) -> set[str]:
    """The flag names a script takes: absl `DEFINE_*('name', ...)` or argparse `add_argument('--name')`, in
    the script and in the modules it imports from its own directory or from refnet_jax/cli.py."""
    sources = [script]
    tree = ast.parse(script.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
        for name in names:
            if name == 'refnet_jax.cli':
                sources.append(ROOT / 'refnet_jax' / 'cli.py')
            elif (script.parent / f'{name}.py').exists():
                sources.append(script.parent / f'{name}.py')
    found = set()
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args):
                continue
            first = node.args[0]
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                continue
            if node.func.attr.startswith('DEFINE'):
                found.add(first.value)
            elif node.func.attr == 'add_argument' and first.value.startswith('--'):
                found.update(a.value[2:] for a in node.args if isinstance(a, ast.Constant))
    return found


def check_config(args: list[str]) -> None:
    """Loads `--config FILE[:arg]` with its `--config.*` overrides as the entry points do (a locked
    ConfigDict: an unknown key or a value of the wrong type is an error), then checks its ranges."""
    from absl import flags
    from ml_collections import config_flags

    from refnet_jax import config_lib

    words = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == '--config' or arg.startswith('--config.'):
            if '=' not in arg and i + 1 < len(args) and not args[i + 1].startswith('--'):
                arg, i = f'{arg}={args[i + 1]}', i + 1  # `--flag value`
            words.append(arg)
        elif arg.startswith('--config='):
            words.append(arg)
        i += 1
    # the config file's path is relative to the repository root, where the docs' commands run
    words = [f'--config={ROOT / w.split("=", 1)[1]}' if w.startswith('--config=') else w for w in words]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, 'the docs command', flag_values=values, lock_config=True)
    with mock.patch.object(sys, 'argv', ['docs', *words]):  # config_flags reads the overrides from sys.argv
        values(sys.argv)
    config_lib.check_ranges(values.config)


def check_python_command(words: list[str]) -> None:
    """A `python ...` command of the docs: its script exists and takes the flags given; a train.py,
    pretrain.py or tools/*.py command's config loads with its overrides and passes `check_ranges`; `-c` code
    compiles."""
    args = words[1:]
    if args[:1] == ['-m']:
        return  # python -m venv / pytest / mkdocs
    if args[:1] == ['-c']:
        compile(args[1], '<docs python -c>', 'exec')
        return
    script = ROOT / args[0]
    assert script.is_file(), f'{args[0]}: no such script'
    known = defined_flags(script)
    for arg in args[1:]:
        if not arg.startswith('--'):
            continue
        name = arg[2:].split('=', 1)[0]
        if name.startswith('config.') and 'config' in known:
            continue
        assert name in known or (name.startswith('no') and name[2:] in known), f'{args[0]}: no flag --{name}'
    if args[0] in ('train.py', 'pretrain.py') or args[0].startswith('tools/'):
        if any(a == '--config' or a.startswith('--config=') for a in args):
            check_config(args[1:])


def check_pip_command(words: list[str]) -> None:
    """`pip install`: the constraints and requirements files exist, and so do the extras it names."""
    extras = set(configparser_extras())
    for i, word in enumerate(words):
        if word in ('-c', '-r'):
            assert (ROOT / words[i + 1]).is_file(), f'pip {word} {words[i + 1]}: no such file'
        match = re.fullmatch(r'\.\[([\w,]+)\]', word)
        if match:
            missing = set(match.group(1).split(',')) - extras
            assert not missing, f'pip install {word}: setup.cfg has no extra {sorted(missing)}'


def configparser_extras() -> list[str]:
    import configparser

    parser = configparser.ConfigParser()
    parser.read(ROOT / 'setup.cfg')
    return list(parser['options.extras_require'])


@pytest.mark.parametrize('page', PAGES)
def test_shell_commands_of_the_docs_are_current(page):
    checked = 0
    for block in blocks(page):
        if block.lang not in ('bash', 'sh', 'shell'):
            continue
        for words in commands(block.code):
            python = [i for i, w in enumerate(words) if w in ('python', 'python3')]
            if python:  # after a launcher (nice, srun ..., env ...), if any
                words = words[python[0] :]
            try:
                if words and words[0] in ('python', 'python3'):
                    check_python_command(words)
                    checked += 1
                elif words[:2] == ['pip', 'install']:
                    check_pip_command(words)
                    checked += 1
            except Exception as e:  # any failure, reported with the command
                pytest.fail(f'{block.where()}: {" ".join(words)}\n{type(e).__name__}: {e}')
    if any(b.lang == 'bash' and 'python' in b.code for b in blocks(page)):
        assert checked, f'{page}: python commands in its blocks, none found by the parser'


RUN_PYTHON = [
    b
    for page in PAGES
    for b in blocks(page)
    if b.lang == 'python'
    and not b.not_run
    and not set(b.markers) & set(COVERED)
    and page not in COVERED_PAGES
]


@pytest.mark.parametrize('block', RUN_PYTHON, ids=Block.where)
def test_python_blocks_of_the_docs_run(block, tmp_path):
    # Run as a user would, from the repository root's files (configs/, train.py), in a scratch directory.
    for name in ('configs', 'train.py', 'pretrain.py'):
        (tmp_path / name).symlink_to(ROOT / name)
    proc = subprocess.run(
        [sys.executable, '-c', block.code],
        cwd=tmp_path,
        env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f'{block.where()}\n{proc.stdout[-3000:]}{proc.stderr[-5000:]}'


INLINE_COMMAND = re.compile(r'`(python3? (?:train\.py|pretrain\.py|tools/\w+\.py) [^`<]*)`')


@pytest.mark.parametrize('page', PAGES)
def test_inline_commands_of_the_docs_are_current(page):
    # The commands written into the text and tables (each result's own command, `S` standing for its seed):
    # their configs, variants and overrides still load. Spans with a <placeholder> are templates, not commands.
    for match in INLINE_COMMAND.finditer((ROOT / page).read_text()):
        words = [re.sub(r'^(--config\.seed)=S$', r'\1=0', w) for w in shlex.split(match.group(1))]
        try:
            check_python_command(words)
        except Exception as e:  # any failure, reported with the command
            pytest.fail(f'{page}: `{match.group(1)}`\n{type(e).__name__}: {e}')
