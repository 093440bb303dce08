"""A source's files, listed once: a local folder or any fsspec URL (s3://...). The readers of
reading.py, folders.py and labels.py look at a set's layout only through a Tree, so an extracted
archive, a folder the user supplies and a prefix in a bucket are read by the same code."""

from __future__ import annotations

import fnmatch
import os
import posixpath

from cloob.storage import Location

# What torchvision's ImageFolder loads (compared case-insensitively), and GIF: Birdsnap's test list names
# a few .gif images, which PIL decodes like the others.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _hidden(rel: str) -> bool:
    # Hidden files and folders and macOS resource forks are never part of a set.
    return any(p.startswith(".") or p == "__MACOSX" for p in rel.split("/"))


class Tree:
    """Every visible file under a location (relative '/'-paths and sizes), with its folders."""

    def __init__(self, where: str | Location):
        self.loc = where if isinstance(where, Location) else Location(str(where))
        if self.loc.is_local:
            files = []
            top = self.loc.root
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
                rel = os.path.relpath(dirpath, top).replace(os.sep, "/")
                for f in filenames:
                    if not _hidden(f):
                        p = f if rel == "." else f"{rel}/{f}"
                        try:
                            files.append((p, os.path.getsize(os.path.join(dirpath, f))))
                        except OSError:
                            continue  # a dangling link
        else:
            files = [(p, s) for p, s in self.loc.files("") if not _hidden(p)]
        self.sizes: dict[str, int] = dict(sorted(files))
        self.subdirs: dict[str, list[str]] = {".": []}
        self.images: dict[str, list[str]] = {}  # folder -> its own images (paths relative to the top)
        for p in self.sizes:
            parent = posixpath.dirname(p) or "."
            if is_image(p):
                self.images.setdefault(parent, []).append(p)
            while parent != ".":
                up = posixpath.dirname(parent) or "."
                kids = self.subdirs.setdefault(up, [])
                name = posixpath.basename(parent)
                if name in kids:
                    break
                kids.append(name)
                self.subdirs.setdefault(parent, [])
                parent = up
        for kids in self.subdirs.values():
            kids.sort()

    def read_bytes(self, rel: str) -> bytes:
        return self.loc.read_bytes(rel)

    def child(self, folder: str, name: str) -> str:
        return name if folder == "." else f"{folder}/{name}"

    def images_under(self, folder: str) -> list[str]:
        """Every image at any depth under folder, sorted."""
        if folder == ".":
            return sorted(p for ps in self.images.values() for p in ps)
        pre = folder + "/"
        return sorted(p for d, ps in self.images.items() if d == folder or d.startswith(pre) for p in ps)

    def find(self, pattern: str) -> list[str]:
        """Files whose name matches a glob pattern, case-insensitively (shallowest first)."""
        pat = pattern.lower()
        hits = [p for p in self.sizes if fnmatch.fnmatchcase(posixpath.basename(p).lower(), pat)]
        return sorted(hits, key=lambda p: (p.count("/"), p))

    def top_level(self) -> list[str]:
        return self.subdirs["."] + [p for p in self.sizes if "/" not in p]
