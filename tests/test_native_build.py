"""The build cache of the compiled kernels (diffusionret.native.build): memoised lookups never reuse a stale build."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from diffusionret.native import build as native_build


@pytest.fixture()
def editable_source(tmp_path, monkeypatch) -> Path:
    """A kernel source that the test can edit, standing in for the package's own C file."""
    assert native_build._compiler() is not None, "no C compiler (cc/gcc/clang) found: the build cache cannot be tested"
    monkeypatch.delenv(native_build.ENV_SWITCH, raising=False)
    source = tmp_path / "probe.c"
    monkeypatch.setattr(native_build, "_source_file", lambda name: source)
    return source


def _probe(source: Path, body: str, directory: Path) -> tuple[Path, int]:
    source.write_text(f"int diffusionret_probe(long x) {{ return {body}; }}\n")
    loaded = native_build.load_function("probe.c", "diffusionret_probe", [ctypes.c_long], "none", directory)
    assert loaded is not None, f"the probe did not build (see the .failed note in {directory})"
    path, function = loaded
    return path, function(20)


def test_edited_source_is_rebuilt_not_reused(editable_source, tmp_path):
    """The memoised parts (CPU flags, compiler, library handles) never stand in for the source's digest."""
    cache = tmp_path / "cache"
    first_path, first = _probe(editable_source, "x + 1", cache)
    assert first == 21
    assert _probe(editable_source, "x + 1", cache) == (first_path, 21)  # unchanged: the same build
    second_path, second = _probe(editable_source, "x * 2", cache)
    assert second == 40 and second_path != first_path
    assert sorted(p.name for p in cache.glob("*.so")) == sorted([first_path.name, second_path.name])


def test_deleted_library_is_rebuilt(editable_source, tmp_path):
    cache = tmp_path / "cache"
    path, _ = _probe(editable_source, "x - 1", cache)
    path.unlink()
    assert _probe(editable_source, "x - 1", cache) == (path, 19) and path.exists()


def test_compiler_lookup_follows_the_environment(tmp_path, monkeypatch):
    fake = tmp_path / "mycc"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", "mycc")
    assert native_build._compiler() != str(fake)  # not on PATH
    monkeypatch.setenv("PATH", f"{tmp_path}:{native_build.os.environ['PATH']}")
    assert native_build._compiler() == str(fake)
