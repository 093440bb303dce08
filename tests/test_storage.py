"""cloob.storage.Location: one API for a local folder and an object-store prefix (moto's S3 server),
with the same answers on both."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from cloob.storage import Location, atomic_write_bytes, is_local, protocol_of


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "root")
    s3 = request.getfixturevalue("s3")
    if not s3.exists("storage-tests"):
        s3.mkdir("storage-tests")
    return f"s3://storage-tests/{uuid.uuid4().hex[:8]}"


def test_urls_paths_and_sub_locations(where):
    loc = Location(where + "/")
    assert loc.url() == where and loc.url("a/b.json") == f"{where}/a/b.json"
    assert loc.is_local == (not where.startswith("s3://")) == is_local(loc.fs)
    sub = loc.sub("a")
    assert sub.url() == f"{where}/a" and sub.url("b.json") == loc.url("a/b.json") and sub.fs is loc.fs
    assert loc.url_of(loc.path("x/y")) == f"{where}/x/y"
    assert Location.on(loc.fs, loc.path("a")).url("b") == f"{where}/a/b"


def test_json_and_bytes_round_trip_atomically(where):
    loc = Location(where)
    assert loc.read_json("none.json") is None and not loc.exists("none.json")
    loc.write_json("d/x.json", {"b": 1, "a": [1, 2]}, indent=1, sort_keys=True)
    assert loc.read_bytes("d/x.json") == json.dumps({"b": 1, "a": [1, 2]}, indent=1, sort_keys=True).encode()
    assert loc.read_json("d/x.json") == {"a": [1, 2], "b": 1} and loc.exists("d/x.json") and loc.isdir("d")
    assert Location(loc.url("d/x.json")).read_json() == {"a": [1, 2], "b": 1}  # one file's URL
    with loc.open("d/x.json", "r") as f:  # text mode, for yaml.safe_load and the like
        assert json.load(f) == {"a": [1, 2], "b": 1}
    atomic_write_bytes(loc.url("d/raw.bin"), b"\x00\x01")
    assert loc.read_bytes("d/raw.bin") == b"\x00\x01" and loc.size("d/raw.bin") == 2
    with pytest.raises(FileNotFoundError):
        loc.read_bytes("d/none.bin")
    loc.write_bytes("d/bad.json", b"{not json")
    with pytest.raises(ValueError):
        loc.read_json("d/bad.json")
    if loc.is_local:  # no temporary file is left behind, and the file is as readable as any other
        assert sorted(os.listdir(loc.path("d"))) == ["bad.json", "raw.bin", "x.json"]
        assert os.stat(loc.path("d/x.json")).st_mode & 0o777 == 0o644


def test_listing_globbing_and_removal(where, tmp_path):
    loc = Location(where)
    assert loc.list() == [] and loc.list("missing") == [] and loc.glob("*.json") == [] and loc.files() == []
    for rel in ("b.json", "a.json", ".hidden.json", "sub/c.json", "sub/deeper/d.txt"):
        loc.write_bytes(rel, rel.encode())
    assert loc.list() == ["a.json", "b.json", "sub"]
    assert loc.list(hidden=True) == [".hidden.json", "a.json", "b.json", "sub"]
    assert loc.list(kind="directory") == ["sub"] and loc.list(kind="file") == ["a.json", "b.json"]
    assert loc.glob("*.json") == ["a.json", "b.json"] and loc.glob("*.json", hidden=True)[0] == ".hidden.json"
    assert loc.glob("sub/*.json") == ["sub/c.json"]
    assert loc.files("sub") == [("sub/c.json", 10), ("sub/deeper/d.txt", 16)]

    # another writer's file appears in the next listing (no stale listing cache on S3)
    Location(where).write_bytes("e.json", b"{}")
    assert "e.json" in loc.list()

    loc.remove("a.json")
    loc.remove("a.json")  # already gone: nothing to do
    loc.remove("sub", recursive=True)
    loc.remove("nothing-here", recursive=True)
    assert loc.list() == ["b.json", "e.json"] and not loc.exists("sub/c.json")


def test_moving_and_copying_local_files_in(where, tmp_path):
    loc = Location(where)
    local = tmp_path / "made" / "part.bin"
    local.parent.mkdir()
    local.write_bytes(b"abc")
    loc.move_in(str(local), "x/part.bin")
    assert loc.read_bytes("x/part.bin") == b"abc" and not local.exists()

    tree = tmp_path / "tree"
    (tree / "k").mkdir(parents=True)
    (tree / "k" / "1.jpg").write_bytes(b"1")
    (tree / "top.txt").write_bytes(b"t")
    loc.copy_in(str(tree), "copied")
    assert loc.files("copied") == [("copied/k/1.jpg", 1), ("copied/top.txt", 1)]
    assert (tree / "top.txt").exists()  # a copy: the source stays
    (tree / "top.txt").write_bytes(b"tt")
    loc.copy_in(str(tree), "copied")  # again, onto the first copy (a run's logs at each checkpoint)
    assert loc.files("copied") == [("copied/k/1.jpg", 1), ("copied/top.txt", 2)]
    loc.sub("mirror").copy_in(str(tree))  # into a location's root
    assert loc.files("mirror") == [("mirror/k/1.jpg", 1), ("mirror/top.txt", 2)]
    loc.makedirs("empty/folder")
    if loc.is_local:
        assert os.path.isdir(loc.path("empty/folder"))


def test_a_local_path_is_made_absolute_and_normal(tmp_path, monkeypatch):
    """`--out gone/../ds` names ./ds: the location does not go through (or create) gone/."""
    monkeypatch.chdir(tmp_path)
    loc = Location("gone/../ds/./")
    assert loc.root == loc.url() == str(tmp_path / "ds")
    loc.write_json("_cloob/x.json", {"a": 1})
    assert sorted(os.listdir(tmp_path)) == ["ds"] and (tmp_path / "ds" / "_cloob" / "x.json").exists()


def test_a_file_systems_protocol_is_its_first_name():
    """fsspec gives fs.protocol as a string or a tuple of names (s3fs: ("s3", "s3a"), the local disk:
    ("file", "local")); the first is the one the code compares."""
    import fsspec

    local, s3, http = (fsspec.filesystem(p) for p in ("file", "s3", "http"))
    assert (protocol_of(local), protocol_of(s3), protocol_of(http)) == ("file", "s3", "http")
    assert is_local(local) and not is_local(s3) and not is_local(http)
