"""What the API says about where files are: paths relative to the index's sources, not the server's layout.

Absolute paths tell a client the server's user name and folder layout; the web page only needs a
name to show. ``diffusionret serve --show-paths`` keeps them absolute (a trusted, local use).
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Sequence

_LIST_SUFFIXES = (".txt", ".csv")


def source_roots(sources: Sequence[str], video_root: str | None) -> list[PurePath]:
    """Folders the indexed paths live under: each source folder, the folder of each list or file source.

    Decided from the names alone (no file system access per answer): a source that is not a list
    may be a folder or a single video, so both it and its folder are roots; a video source then
    matches its folder, since a path is never shown relative to itself.
    """
    roots = [PurePath(video_root)] if video_root else []
    for source in sources:
        path = PurePath(source)
        roots.append(path.parent)
        if path.suffix.lower() not in _LIST_SUFFIXES:
            roots.append(path)
    # The deepest root first: the most specific relative path wins.
    return sorted(set(roots), key=lambda root: len(root.parts), reverse=True)


def public_path(path: str, roots: Sequence[PurePath]) -> str:
    """``path`` as ``<source folder name>/<path inside it>``, or the bare file name outside every root.

    Example:
        ``/home/ana/clips/2024/beach.mp4`` under the source ``/home/ana/clips`` is ``clips/2024/beach.mp4``.
    """
    pure = PurePath(path)
    for root in roots:
        if pure.is_relative_to(root) and pure != root:
            return str(PurePath(root.name) / pure.relative_to(root)) if root.name else str(pure.relative_to(root))
    return pure.name
