"""The docs: the site builds with warnings as errors, its generated pages follow the code, and the README stays
the front door (at most about 200 lines)."""

import importlib.util
import os
import pathlib
import subprocess
import sys

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
        assert f'| `{name}` | `{cls.__module__}.{cls.__qualname__}` |' in page, name


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
