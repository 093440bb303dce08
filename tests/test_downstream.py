"""Downstream (zero-shot) sets: the shipped specs, and preparation from generated archives served over
a local HTTP server, into a local folder and into S3 (moto server); safe extraction; clear errors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml
from PIL import Image

from cloob.errors import CloobError
from cloob.evaluate.sets import archive
from cloob.evaluate.sets.folders import Pairing
from cloob.evaluate.sets.manifest import dataset_root, read_manifest
from cloob.evaluate.sets.prepare import prepare_downstream
from cloob.evaluate.sets.spec import list_downstream_specs, load_downstream_spec, spec_hash

WNIDS = load_downstream_spec("imagenet").folders  # ImageNet-1k's wnids, sorted
EXPECTED = {"birdsnap": 500, "country211": 211, "flowers102": 102, "gtsrb": 43, "stanford_cars": 196,
            "ucf101": 101, "imagenet": 1000, "imagenet_v2": 1000}
# Class name -> folder name in the generated archives (normalize: alnum_casefold maps one to the other).
CLASSES = {"red apple": "red_apple", "green pear": "Green-Pear", "blue plum": "blue_plum"}
TEST_COUNTS = {"red_apple": 3, "Green-Pear": 2, "blue_plum": 1}


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


JPEG = _jpeg()


def _tree(root: Path, counts: dict[str, int], prefix: str = "toy/test") -> Path:
    for folder, n in counts.items():
        d = root / prefix / folder
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (d / f"img{i}.jpg").write_bytes(JPEG)
        (d / "notes.txt").write_text("not an image")  # ignored by the counts
    return root


def _archive(src: Path, dest: Path) -> Path:
    if dest.name.endswith(".zip"):
        with zipfile.ZipFile(dest, "w") as zf:
            for p in sorted(src.rglob("*")):
                zf.write(p, p.relative_to(src).as_posix())
    else:
        with tarfile.open(dest, "w:gz") as tf:
            for p in sorted(src.iterdir()):
                tf.add(p, p.name)
    return dest


def _spec(tmp: Path, url: str, *, name: str = "toy", layout: dict | None = None, **source) -> Path:
    data = {"name": name, "title": "Toy fruit", "homepage": "https://example.org/toy",
            "source": {"kind": "download", "url": url, **source},
            "layout": layout or {"root": "auto", "split": "test", "by": "name", "normalize": "alnum_casefold"},
            "main_metric": "top1", "classes": list(CLASSES),
            "templates": ["a photo of a {}.", "a blurry photo of a {}."]}
    p = tmp / f"{name}-{len(list(tmp.glob('*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


@pytest.fixture
def served(tmp_path, http_server):
    """(base URL, folder) of an HTTP server holding toy.tar.gz and toy.zip: test/ (3 classes, 6 images)
    and a train/ split with the same class folders (auto root must pick test/)."""
    src = _tree(tmp_path / "src", TEST_COUNTS)
    _tree(src, {f: 1 for f in TEST_COUNTS}, prefix="toy/train")
    www = tmp_path / "www"
    www.mkdir()
    _archive(src, www / "toy.tar.gz")
    _archive(src, www / "toy.zip")
    return http_server(www), www


# ------------------------------------------------------------------------------------------ shipped specs

def test_shipped_specs_validate():
    assert set(list_downstream_specs()) == set(EXPECTED)
    for name, n in EXPECTED.items():
        spec = load_downstream_spec(name)
        assert spec.name == name and len(spec.class_names) == n, name
        assert spec.templates and all("{}" in t for t in spec.templates), name
        assert len(spec_hash(spec)) == 64
        if spec.source.kind == "download":
            assert spec.source.url.startswith("https://")
    inet = load_downstream_spec("imagenet")  # names and templates resolved from open_clip's metadata
    assert inet.class_names[:2] == ["tench", "goldfish"] and inet.class_names[-1] == "toilet paper"
    assert len(inet.templates) == 80 and inet.templates[0] == "a bad photo of a {}."
    assert inet.source.kind == "user-supplied" and "ILSVRC2012_img_val.tar" in inet.source.instructions
    assert load_downstream_spec("imagenet_v2").layout.by == "index"
    c211 = load_downstream_spec("country211")
    assert c211.folders[c211.class_names.index("Austria")] == "AT" and c211.folders == sorted(c211.folders)
    assert load_downstream_spec("flowers102").main_metric == "mean_per_class_recall"


def test_spec_errors_name_the_field(tmp_path):
    good = yaml.safe_load(_spec(tmp_path, "https://example.org/x.zip").read_text())
    bad = dict(good, colour="red")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(CloobError, match="colour"):
        load_downstream_spec(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(dict(good, templates=["a photo"])))
    with pytest.raises(CloobError, match="templates.*no '{}'"):
        load_downstream_spec(tmp_path / "bad.yaml")
    with pytest.raises(CloobError, match="not found"):
        load_downstream_spec("no_such_set")


# ------------------------------------------------------------------------------------------ preparation

@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_prepare_from_http(fmt, served, tmp_path, capsys):
    base, www = served
    url = f"{base}/toy.{fmt}?token=s3cr3t"  # a query string may carry credentials: never shown
    spec = _spec(tmp_path, url)
    out, cache = tmp_path / "out", tmp_path / "cache"
    # A stale partial download: the test server ignores Range, so the download must start over.
    final = archive.cache_path(url, cache)
    part = final.with_name(final.name + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage from an interrupted run")

    s = prepare_downstream(spec, str(out), cache_dir=cache, progress=True)
    sha = hashlib.sha256((www / f"toy.{fmt}").read_bytes()).hexdigest()
    assert (s["name"], s["images"], s["classes"], s["sha256"], s["reused"]) == ("toy", 6, 3, sha, False)
    assert s["bytes"] == (www / f"toy.{fmt}").stat().st_size
    err = capsys.readouterr().err
    assert f"source.sha256: {sha}" in err and "s3cr3t" not in err  # unpinned: printed so it can be pinned
    assert "s3cr3t" not in (out / "toy" / "manifest.json").read_text()

    m = read_manifest(str(out), "toy")
    assert m["root"] == "." and m["spec_sha256"] == spec_hash(load_downstream_spec(spec))
    assert m["archive"]["sha256"] == sha and m["images"] == 6 and m["main_metric"] == "top1"
    assert [(c["name"], c["source"], c["images"], c["how"]) for c in m["classes"]] == \
        [(c, f, TEST_COUNTS[f], "folder name") for c, f in CLASSES.items()]
    assert m["split"] == {"name": "test", "by": "folder 'toy/test'", "left_out": 3}  # train/ left out
    assert dataset_root(m, s["uri"]) == str(out / "toy")
    items = (out / "toy" / "items.tsv").read_text().splitlines()
    assert len(items) == 6 and all(i.startswith("toy/test/") for i in items)
    assert (out / "toy" / "toy" / "test" / "Green-Pear" / "img1.jpg").read_bytes() == JPEG
    assert sorted(os.listdir(out)) == ["toy"]  # no partial folders left behind
    assert not part.exists()

    again = prepare_downstream(spec, str(out), cache_dir=cache, progress=False)
    assert again["reused"] and again["images"] == 6
    assert read_manifest(str(out), "toy")["created_at"] == m["created_at"]
    (www / f"toy.{fmt}").unlink()  # a forced rerun works from the cache, without the server's file
    forced = prepare_downstream(spec, str(out), cache_dir=cache, progress=False, force=True)
    assert not forced["reused"] and forced["sha256"] == sha


def test_checksum_mismatch_refused(served, tmp_path):
    base, www = served
    out, cache = tmp_path / "out", tmp_path / "cache"
    real = hashlib.sha256((www / "toy.zip").read_bytes()).hexdigest()
    spec = _spec(tmp_path, f"{base}/toy.zip", sha256="0" * 64)
    with pytest.raises(CloobError) as e:
        prepare_downstream(spec, str(out), cache_dir=cache, progress=False)
    assert f"expected {'0' * 64}, got {real}" in str(e.value) and e.value.fix
    spec = _spec(tmp_path, f"{base}/toy.zip", size=12345)
    with pytest.raises(CloobError, match=f"expected 12345 bytes, got {(www / 'toy.zip').stat().st_size}"):
        prepare_downstream(spec, str(out), cache_dir=cache, progress=False)
    assert not out.exists() or os.listdir(out) == []
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []  # bad files deleted


# Members (name, tar type, link target, data) that each unsafe archive adds after one good image.
_EVIL = {
    "../evil.txt": [("../evil.txt", tarfile.REGTYPE, "", b"evil")],
    "/abs.txt": [("/abs.txt", tarfile.REGTYPE, "", b"evil")],
    "toy/../../evil.txt": [("toy/../../evil.txt", tarfile.REGTYPE, "", b"evil")],
    "symlink-out": [("toy/test/link", tarfile.SYMTYPE, "../../../outside", b"")],
    "symlink-abs": [("toy/link", tarfile.SYMTYPE, "/etc", b"")],
    # a link that stays inside, then a member written through it
    "through-link": [("toy/link", tarfile.SYMTYPE, "test", b""), ("toy/link/x.txt", tarfile.REGTYPE, "", b"evil")],
    "hardlink-out": [("toy/hard", tarfile.LNKTYPE, "../outside", b"")],
    "fifo": [("toy/fifo", tarfile.FIFOTYPE, "", b"")],
}


def _evil_tar(path: Path, kind: str) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        good = tarfile.TarInfo("toy/test/red_apple/img0.jpg")
        good.size = len(JPEG)
        tf.addfile(good, io.BytesIO(JPEG))
        for name, type_, target, data in _EVIL[kind]:
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname, ti.size = type_, target, len(data)
            tf.addfile(ti, io.BytesIO(data) if data else None)
    return path


@pytest.mark.parametrize("kind", list(_EVIL))
def test_unsafe_tar_refused(kind, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    bad = _evil_tar(work / "evil.tar.gz", kind)
    out = work / "out"
    spec = _spec(tmp_path, "https://example.org/unused.tar.gz")
    with pytest.raises(CloobError, match="refusing to extract evil.tar.gz: member") as e:
        prepare_downstream(spec, str(out), source=str(bad), cache_dir=work / "cache", progress=False)
    assert "nothing was extracted" in e.value.fix
    # Nothing outside the target, and nothing at all in the output.
    assert not list(tmp_path.rglob("evil.txt")) and not (tmp_path / "outside").exists()
    assert not Path("/abs.txt").exists()
    assert not out.exists() or os.listdir(out) == []


def test_unsafe_zip_refused(tmp_path):
    for i, name in enumerate(["../evil.txt", "/abs.txt", "a/../../evil.txt"]):
        bad = tmp_path / f"evil{i}.zip"
        with zipfile.ZipFile(bad, "w") as zf:
            zf.writestr("toy/test/red_apple/img0.jpg", JPEG)
            zf.writestr(zipfile.ZipInfo(name), b"evil")
        dest = tmp_path / f"x{i}" / "dest"
        with pytest.raises(CloobError, match=f"member {name!r}"):
            archive.safe_extract(bad, dest)
        assert os.listdir(dest) == []
    link = zipfile.ZipInfo("toy/link")
    link.external_attr = (0o120777 << 16)  # a symlink entry
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as zf:
        zf.writestr(link, "../../outside")
    with pytest.raises(CloobError, match="symlink"):
        archive.safe_extract(tmp_path / "link.zip", tmp_path / "y")
    assert not list(tmp_path.rglob("evil.txt"))


def test_damaged_or_foreign_archive(tmp_path):
    src = _tree(tmp_path / "src", TEST_COUNTS)
    whole = _archive(src, tmp_path / "toy.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CloobError, match="damaged or truncated"):
        archive.safe_extract(tmp_path / "cut.tar.gz", tmp_path / "x")
    (tmp_path / "page.html").write_text("<html>not found</html>")
    with pytest.raises(CloobError, match="neither a zip nor a tar"):
        archive.safe_extract(tmp_path / "page.html", tmp_path / "y")


def test_class_folder_mismatch_lists_differences(tmp_path):
    src = _tree(tmp_path / "src", {"red_apple": 1, "Green-Pear": 1, "purple_grape": 2, "kiwi": 1})
    bad = _archive(src, tmp_path / "toy.tar.gz")
    spec = _spec(tmp_path, "https://example.org/unused.tar.gz",
                 layout={"root": "toy/test", "by": "name", "normalize": "alnum_casefold"})
    with pytest.raises(CloobError) as e:
        prepare_downstream(spec, str(tmp_path / "out"), source=str(bad), cache_dir=tmp_path / "c", progress=False)
    msg = str(e.value)
    assert "1 classes without a folder: blue plum" in msg and "2 folders that name no class: kiwi, purple_grape" in msg
    assert e.value.fix
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def _pairs(spec, folders: list[str]) -> dict[str, int]:
    p = Pairing(spec, folders)
    return {f: i for f, (i, _) in p.matched.items()} | {f: None for f in p.unknown}


def test_folders_pair_by_published_ids_never_by_position():
    v2 = load_downstream_spec("imagenet_v2")
    got = _pairs(v2, [str(i) for i in range(1000)][::-1])
    assert got["2"] == 2 and got["10"] == 10 and got["999"] == 999  # not 0, 1, 10, 100, ... in text order
    assert _pairs(v2, ["1000"]) == {"1000": None}
    flowers = load_downstream_spec("flowers102")  # numbers: 1 (flower_data's folders 1..102)
    assert _pairs(flowers, [f"{i:03d}" for i in range(1, 103)])["010"] == 9
    assert _pairs(flowers, [str(i) for i in range(1, 103)])["10"] == 9
    assert _pairs(flowers, ["0", "103"]) == {"0": None, "103": None}
    gtsrb = load_downstream_spec("gtsrb")  # numbers: 0 (ClassId folders 00000..00042)
    assert _pairs(gtsrb, ["00000", "00042", "00043"]) == {"00000": 0, "00042": 42, "00043": None}


def test_positional_pairing_is_refused_in_a_spec(tmp_path):
    good = yaml.safe_load(_spec(tmp_path, "https://example.org/x.zip").read_text())
    (tmp_path / "sorted.yaml").write_text(yaml.safe_dump(dict(good, layout={"root": "auto", "by": "sorted"})))
    with pytest.raises(CloobError, match="by: sorted.*not supported any more.*cannot be verified"):
        load_downstream_spec(tmp_path / "sorted.yaml")


def test_imagenet_v2_shipped_spec_from_local_archive(tmp_path):
    # The real layout: imagenetv2-matched-frequency-format-val/<0..999>/, numbers in class order.
    arc = tmp_path / "imagenetv2-matched-frequency.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        for k in range(1000):
            ti = tarfile.TarInfo(f"imagenetv2-matched-frequency-format-val/{k}/{k}_0.jpeg")
            ti.size = len(JPEG)
            tf.addfile(ti, io.BytesIO(JPEG))
    s = prepare_downstream("imagenet_v2", str(tmp_path / "out"), source=str(arc), progress=False)
    assert (s["images"], s["classes"]) == (1000, 1000)
    m = read_manifest(str(tmp_path / "out"), "imagenet_v2")
    assert m["root"] == "." and m["classes"][0]["how"] == "class id 0 (counted from 0)"
    assert [c["source"] for c in m["classes"][:11]] == [str(k) for k in range(11)]  # not 0, 1, 10, 100, ...
    assert (m["classes"][10]["name"], m["classes"][10]["source"]) == ("brambling", "10")
    assert m["source"] == {"kind": "archive", "url": str(arc)}
    assert m["expected_images"] == 10000 and "1000 images where the published test split has 10000" in m["warnings"][0]


# ------------------------------------------------------------------------------------------ imagenet

def test_imagenet_needs_source(tmp_path):
    with pytest.raises(CloobError) as e:
        prepare_downstream("imagenet", str(tmp_path / "out"), progress=False)
    assert "ILSVRC2012_img_val.tar" in str(e.value) and "ILSVRC2012_devkit_t12.tar.gz" in str(e.value)
    assert "--source imagenet=" in e.value.fix
    with pytest.raises(CloobError, match="does not exist"):
        prepare_downstream("imagenet", str(tmp_path / "out"), source=str(tmp_path / "nope"), progress=False)


def _fake_imagenet(root: Path, n: int = 1000) -> Path:
    for i in range(n):
        d = root / "val" / WNIDS[i]
        d.mkdir(parents=True)
        (d / "ILSVRC2012_val_0.JPEG").write_bytes(JPEG)
    (root / "ILSVRC2012_devkit_t12").mkdir()  # other things next to val/ are fine
    return root


def test_imagenet_user_supplied(tmp_path):
    src = _fake_imagenet(tmp_path / "imagenet")
    out = tmp_path / "out"
    s = prepare_downstream("imagenet", str(out), source=str(src), progress=False)
    assert (s["images"], s["classes"], s["sha256"]) == (1000, 1000, None)
    m = read_manifest(str(out), "imagenet")
    assert m["external_root"] == str(src.resolve()) and m["root"] is None  # pointed at, not copied
    assert dataset_root(m, s["uri"]) == m["external_root"]
    assert m["classes"][0]["source"] == "n01440764" and m["classes"][0]["name"] == "tench"
    assert m["classes"][0]["how"] == "wnid"  # by its name in the spec's list, not its sorted position
    assert sorted(os.listdir(out / "imagenet")) == ["items.tsv", "manifest.json"]
    assert prepare_downstream("imagenet", str(out), source=str(src), progress=False)["reused"]

    broken = tmp_path / "broken"
    _fake_imagenet(broken, 999)
    (broken / "val" / "README").mkdir()
    (broken / "val" / "README" / "notes.txt").write_text("not a class")
    with pytest.raises(CloobError, match="1 classes without a folder: toilet paper.*name no class: README"):
        prepare_downstream("imagenet", str(out), source=str(broken / "val"), progress=False)
    # 1000 wnid folders that are not ImageNet-1k's: refused by name, not paired by sorted position
    other = tmp_path / "other" / "val"
    for i in range(1000):
        (other / f"n{i:08d}").mkdir(parents=True)
        (other / f"n{i:08d}" / "a.JPEG").write_bytes(JPEG)
    with pytest.raises(CloobError, match="do not name imagenet's classes.*'n00000000' -> 'tench'.*is refused"):
        prepare_downstream("imagenet", str(out), source=str(other), progress=False)


# ------------------------------------------------------------------------------------------ S3 output

def test_prepare_to_s3(s3, served, tmp_path):
    base, _ = served
    s3.mkdir("dstream")  # the moto server lives for the session: one bucket per test
    spec = _spec(tmp_path, f"{base}/toy.tar.gz")
    out = "s3://dstream/downstream"
    s = prepare_downstream(spec, out, cache_dir=tmp_path / "cache", progress=False)
    assert s["uri"] == "s3://dstream/downstream/toy" and s["images"] == 6
    m = json.loads(s3.cat_file("dstream/downstream/toy/manifest.json"))
    assert m["root"] == "." and [c["images"] for c in m["classes"]] == [3, 2, 1]
    assert s3.cat_file("dstream/downstream/toy/toy/test/blue_plum/img0.jpg") == JPEG
    assert len(s3.glob("dstream/downstream/toy/toy/*/*/*.jpg")) == 6  # the test split only
    assert not list((tmp_path / "cache").glob(".extract-*"))  # local scratch removed
    assert prepare_downstream(spec, out, cache_dir=tmp_path / "cache", progress=False)["reused"]


def test_user_supplied_to_s3_is_uploaded(s3, tmp_path):
    # The imagenet path (a user-supplied folder) with a small spec of the same kind.
    s3.mkdir("supplied")  # the moto server lives for the session: one bucket per test
    data = yaml.safe_load(_spec(tmp_path, "unused").read_text())
    data["source"] = {"kind": "user-supplied", "instructions": "put the fruit photos in val/<class>/"}
    data["layout"] = {"root": "auto", "split": "val", "by": "name", "normalize": "alnum_casefold"}
    (tmp_path / "supplied.yaml").write_text(yaml.safe_dump(data))
    src = _tree(tmp_path / "mine", TEST_COUNTS, prefix="val")
    s = prepare_downstream(tmp_path / "supplied.yaml", "s3://supplied/ds", source=str(src), progress=False)
    assert s["images"] == 6 and s["sha256"] is None
    m = json.loads(s3.cat_file("supplied/ds/toy/manifest.json"))
    assert m["root"] == "." and m["external_root"] is None  # an object store gets a copy
    assert s3.cat_file("supplied/ds/toy/val/Green-Pear/img1.jpg") == JPEG
    assert prepare_downstream(tmp_path / "supplied.yaml", "s3://supplied/ds", source=str(src),
                              progress=False)["reused"]


def test_cli_prepare_downstream_errors_and_summary(tmp_path, capsys):
    from cloob.cli import main as cli_main

    out = str(tmp_path / "ds")
    assert cli_main(["prepare-downstream", "imagenet", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "imagenet must be supplied by you" in err and "--source imagenet=" in err
    assert cli_main(["prepare-downstream", "imagenet", "--out", out, "--source", "imagenet"]) == 2
    assert "is not name=value" in capsys.readouterr().err
    assert cli_main(["prepare-downstream", "gtsrb", "--out", out, "--source", "imagenet=/x"]) == 2
    assert "not among the datasets" in capsys.readouterr().err
    # Two sets, one broken: the good one is still prepared and the summary says so.
    val = tmp_path / "val"
    for i in range(1000):
        (val / WNIDS[i]).mkdir(parents=True)
        (val / WNIDS[i] / "a.jpg").write_bytes(b"x")
    rc = cli_main(["prepare-downstream", "imagenet", "no-such-set", "--out", out, "--source", f"imagenet={val}",
                   "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 2 and "no-such-set" in captured.err
    assert "1 prepared, 1 failed" in captured.out and "imagenet" in captured.out and " 1000 " in captured.out


def test_a_generated_sets_validation_split_draws_other_pictures_of_the_same_classes(tmp_path):
    """shapes_val/colors_val (generator seed 1) are the tuning study's sets: the same classes and prompts
    as shapes/colors, other pictures; the sets prepared before the seed field existed keep their hash."""
    from cloob.evaluate.sets.prepare import prepare_downstream

    for name in ("shapes", "colors"):
        test, val = load_downstream_spec(name), load_downstream_spec(f"{name}_val")
        assert (val.class_names, val.templates) == (test.class_names, test.templates)
        assert (test.source.seed, val.source.seed) == (None, 1) and spec_hash(test) != spec_hash(val)
    assert spec_hash(load_downstream_spec("shapes")) == "05e76f6faabede9dc8fa088c96e655302f6873b24a0f5bd078539389d51b4dfc"
    roots = {n: Path(prepare_downstream(n, str(tmp_path), progress=False)["uri"]) for n in ("colors", "colors_val")}
    files = {n: sorted(p.relative_to(r) for p in r.rglob("*.jpg")) for n, r in roots.items()}
    assert files["colors"] == files["colors_val"] and len(files["colors"]) == 6 * 40
    same = sum((roots["colors"] / f).read_bytes() == (roots["colors_val"] / f).read_bytes() for f in files["colors"])
    assert same == 0


# ------------------------------------------------------------------------------------------ one path

def test_a_folder_whose_names_name_no_class_is_refused_with_the_pairs_it_would_have_made(tmp_path):
    # Folders named otherwise (numbered by some unknown order): a positional pairing is never made.
    src = _tree(tmp_path / "src", {"c07": 1, "c02": 2, "c11": 1}, prefix="toy/test")
    spec = _spec(tmp_path, "https://example.org/unused.zip")
    with pytest.raises(CloobError) as e:
        prepare_downstream(spec, str(tmp_path / "out"), source=str(src), progress=False)
    msg = str(e.value)
    assert "do not name toy's classes" in msg and "'c02' -> 'red apple'" in msg and "is refused" in msg
    assert "`folders:`" in e.value.fix and "aliases" in e.value.fix
    assert not (tmp_path / "out" / "toy" / "manifest.json").exists()


def test_prepare_and_evaluate_read_archives_and_folders_through_one_path(tmp_path, monkeypatch):
    from cloob.evaluate.datasets import open_classification_set

    monkeypatch.setenv("CLOOB_CACHE", str(tmp_path / "cache"))  # evaluate --data unpacks an archive there

    src = _tree(tmp_path / "src", TEST_COUNTS)
    _tree(src, {f: 1 for f in TEST_COUNTS}, prefix="toy/train")
    arc = _archive(src, tmp_path / "toy.zip")
    spec = _spec(tmp_path, "https://example.org/unused.zip")
    from_folder = prepare_downstream(spec, str(tmp_path / "a"), source=str(src), progress=False)
    from_archive = prepare_downstream(spec, str(tmp_path / "b"), source=str(arc), progress=False,
                                      cache_dir=tmp_path / "c")
    assert from_folder["images"] == from_archive["images"] == 6  # the test split, by folder name
    assert from_folder["pairs"] == from_archive["pairs"]
    m = read_manifest(str(tmp_path / "a"), "toy")
    assert m["source"] == {"kind": "folder", "path": str(src.resolve())} and m["external_root"] == str(src.resolve())
    # evaluate --data: the folder, the archive and the prepared folders give the same (image, class) pairs
    def pairs(ds):
        return sorted((it.rsplit("/", 3)[-3] + "/" + it.rsplit("/", 2)[-2] + "/" + it.rsplit("/", 1)[-1], c)
                      for it, c in ds.items)
    sets = [open_classification_set(spec, str(p)) for p in (src, arc, tmp_path / "a" / "toy", tmp_path / "b" / "toy")]
    assert [s.kind for s in sets] == ["folders", "prepared", "prepared", "prepared"]
    assert all(pairs(s) == pairs(sets[0]) for s in sets) and len(sets[0].items) == 6
    assert {c for _, c in sets[0].items} == {0, 1, 2}


def test_a_set_prepared_by_the_old_unverified_version_is_prepared_again(tmp_path):
    from cloob.evaluate.datasets import open_classification_set

    out = tmp_path / "out"
    prepare_downstream("colors", str(out), progress=False)
    m = json.loads((out / "colors" / "manifest.json").read_text())
    m["format"] = "cloob.downstream/1"  # what the versions that paired by sorted order wrote
    (out / "colors" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CloobError, match="older version of cloob.*not verified") as e:
        open_classification_set("colors", str(out / "colors"))
    assert "--force" in e.value.fix
    again = prepare_downstream("colors", str(out), progress=False)
    assert not again["reused"] and len(open_classification_set("colors", str(out / "colors")).items) == 240


def test_more_images_than_the_published_test_split_is_refused_fewer_is_flagged(tmp_path):
    """A copy holding train and test images in one folder per class (Birdsnap's download/images/ passed
    without its test_images.txt, every UCF101 frame without a split list) is not a test set."""
    src = _tree(tmp_path / "src", {"red_apple": 10, "Green-Pear": 10, "blue_plum": 10}, prefix="fruit")
    data = yaml.safe_load(_spec(tmp_path, "https://example.org/unused.zip").read_text())
    (tmp_path / "many.yaml").write_text(yaml.safe_dump(dict(data, test_size=12, split_files=["test_list.txt"])))
    with pytest.raises(CloobError) as e:
        prepare_downstream(tmp_path / "many.yaml", str(tmp_path / "out"), source=str(src), progress=False)
    assert "holds 30 images where toy's test split has 12" in str(e.value)
    assert "test_list.txt" in e.value.fix and read_manifest(str(tmp_path / "out"), "toy") is None
    (tmp_path / "few.yaml").write_text(yaml.safe_dump(dict(data, test_size=40)))
    s = prepare_downstream(tmp_path / "few.yaml", str(tmp_path / "out"), source=str(src), progress=False)
    assert s["images"] == 30 and s["warnings"] == ["30 images where the published test split has 40: 10 (25.0%) "
                                                   "missing (dead links upstream, a partial copy or another split)"]
