"""Shard writer + LLaVA-JSON converter: byte-identical round trip, bad entries skipped by reason."""

import io
import json
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from grace_ds.data import ShardSample, read_manifest, write_shards
from grace_ds.data.convert import convert, iter_json_entries, main
from grace_ds.data.format import iter_tar_samples


def _png(colour, size=(20, 14)):
    b = io.BytesIO()
    Image.new("RGB", size, colour).save(b, format="PNG")
    return b.getvalue()


def _jpg(colour):
    b = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(b, format="JPEG", quality=90)
    return b.getvalue()


def _conv(q="<image>\nWhat is it?", a="A cat."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture()
def llava(tmp_path):
    """A LLaVA-format dataset with good entries (1 image, 2 images, text only, multi-turn, ids that
    need sanitising, a repeated id) and one entry per kind of bad input."""
    root = tmp_path / "images"
    (root / "coco").mkdir(parents=True)
    files = {"coco/a.png": _png((255, 0, 0)), "coco/b.jpg": _jpg((0, 255, 0)), "c.webp": None, "coco/d.png": _png((0, 0, 9))}
    b = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(b, format="WEBP")
    files["c.webp"] = b.getvalue()
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "anim.gif").write_bytes(b"GIF89a")
    good = [
        {"id": "000001", "image": "coco/a.png", "conversations": _conv()},
        {"id": "two.images/x", "image": ["coco/b.jpg", "c.webp"],
         "conversations": _conv("<image>\n<image>\nCompare them.", "The first is green.")},
        {"id": "text-only", "conversations": _conv("Say hi.", "Hi.")},
        {"id": "multi", "image": "coco/d.png", "model": "gpt4v",
         "conversations": _conv() + [{"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "000001", "image": "coco/a.png", "conversations": _conv("<image>\nAgain?", "Yes.")},
    ]
    bad = [
        ({"id": "miss", "image": "coco/nope.jpg", "conversations": _conv()}, "missing_image"),
        ({"id": "corrupt", "image": "broken.jpg", "conversations": _conv()}, "unreadable_image"),
        ({"id": "gif", "image": "anim.gif", "conversations": _conv()}, "unsupported_image_format"),
        ({"id": "noturns", "image": "coco/a.png", "conversations": []}, "no_turns"),
        ({"id": "role", "image": "coco/a.png", "conversations": [{"from": "system", "value": "<image>"}, {"from": "gpt", "value": "x"}]}, "wrong_role"),
        ({"id": "nogpt", "image": "coco/a.png", "conversations": [{"from": "human", "value": "<image>\nHi"}]}, "no_assistant_turn"),
        ({"id": "tags", "image": "coco/a.png", "conversations": _conv("<image>\n<image>\nTwo?", "No.")}, "more_image_tags_than_images"),
        ({"id": "notag", "image": "coco/a.png", "conversations": _conv("What is it?", "x")}, "fewer_image_tags_than_images"),
        ({"id": "turn", "image": "coco/a.png", "conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}, "malformed_turn"),
        ({"id": "imgans", "image": "coco/a.png", "conversations": _conv("<image>\nDraw", "<image>")}, "image_tag_in_assistant_turn"),
        ("just a string", "malformed_entry"),
    ]
    entries = []
    for i, e in enumerate(good):
        entries.append(e)
        if i < len(bad):
            entries.append(bad[i][0])
    entries += [b[0] for b in bad[len(good):]]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(entries, indent=2))
    return path, root, good, {r for _, r in bad}


def test_json_array_streams_across_chunk_boundaries(tmp_path, llava):
    path = llava[0]
    want = json.loads(path.read_text())
    assert list(iter_json_entries(path, chunk_chars=7)) == want      # tiny chunks: entries straddle them
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(e) for e in want) + "\n{broken\n")
    got = list(iter_json_entries(jl))
    assert got[:-1] == want and type(got[-1]).__name__ == "_BadEntry"


def test_round_trip_is_byte_identical(tmp_path, llava):
    path, root, good, _ = llava
    rep, manifest = convert(path, root, tmp_path / "out", samples_per_shard=2, workers=2, progress=False)
    assert rep.converted == len(good) and manifest.total == len(good)
    assert [s.samples for s in manifest.shards] == [2, 2, 1]
    got = [s for p in manifest.shard_paths() for s in iter_tar_samples(p)]
    keys = [k for k, _ in got]
    assert keys == ["000001", "two_images_x", "text-only", "multi", "000001_dup1"]
    assert rep.renamed_duplicate_ids == 1
    for (key, members), entry in zip(got, good):
        rec = json.loads(members["json"])
        assert rec["id"] == entry["id"] and rec["conversations"] == entry["conversations"]
        imgs = entry.get("image", [])
        imgs = [imgs] if isinstance(imgs, str) else imgs
        ext = [m for m in members if m != "json"]
        assert len(ext) == len(imgs)
        for i, rel in enumerate(imgs):
            suffix = f"{i}.{rel.rsplit('.', 1)[1]}"
            assert members[suffix] == (root / rel).read_bytes(), f"{key}: image {i} not byte-identical"
    assert json.loads(got[3][1]["json"])["meta"]["model"] == "gpt4v"   # extra fields kept under meta


def test_bad_entries_skipped_and_reported_by_reason(tmp_path, llava, capsys):
    path, root, good, reasons = llava
    out = tmp_path / "out"
    assert main(["--json", str(path), "--image-root", str(root), "--out", str(out),
                 "--samples-per-shard", "3", "--quiet"]) == 0
    report = json.loads((out / "convert_report.json").read_text())
    assert set(report["skipped"]) == reasons and all(n == 1 for n in report["skipped"].values())
    assert report["entries"] == len(good) + len(reasons) and report["converted"] == len(good)
    assert report["examples"]["missing_image"][0]["id"] == "miss"
    err = capsys.readouterr().err
    for r in reasons:
        assert r in err          # the end-of-run summary lists every reason
    assert read_manifest(out).total == len(good)


def test_write_shards_deterministic_atomic_and_webdataset_readable(tmp_path):
    samples = [ShardSample(f"k{i}", {"id": i, "conversations": _conv(), "meta": {}}, [("png", _png((i, 0, 0)))])
               for i in range(5)]
    m1 = write_shards(iter(samples), tmp_path / "a", "s", 2)
    m2 = write_shards(iter(samples), tmp_path / "b", "s", 2)
    for p1, p2 in zip(m1.shard_paths(), m2.shard_paths()):
        assert p1.read_bytes() == p2.read_bytes()
    assert not list((tmp_path / "a").glob("*.tmp"))
    with pytest.raises(FileExistsError):
        write_shards(iter(samples), tmp_path / "a", "s", 2)
    got = list(wds.WebDataset([str(p) for p in m1.shard_paths()], shardshuffle=False))
    assert [g["__key__"] for g in got] == [f"k{i}" for i in range(5)]
    assert got[3]["0.png"] == samples[3].images[0][1]
    with tarfile.open(m1.shard_paths()[0]) as t:
        assert all(ti.mtime == 0 and ti.uid == 0 for ti in t)


def test_failed_write_leaves_no_manifest(tmp_path):
    def gen():
        yield ShardSample("a", {"id": "a", "conversations": _conv()}, [])
        raise RuntimeError("source died")
    with pytest.raises(RuntimeError):
        write_shards(gen(), tmp_path, "s", 10)
    assert not (tmp_path / "manifest.json").exists() and not list(tmp_path.glob("*.tar*"))
    with pytest.raises(FileNotFoundError, match="manifest"):
        read_manifest(tmp_path)


def test_bad_keys_and_duplicates_rejected(tmp_path):
    with pytest.raises(ValueError, match="invalid"):
        write_shards([ShardSample("a.b", {}, [])], tmp_path / "x", "s", 2)
    with pytest.raises(ValueError, match="duplicate"):
        write_shards([ShardSample("a", {}, []), ShardSample("a", {}, [])], tmp_path / "y", "s", 2)
