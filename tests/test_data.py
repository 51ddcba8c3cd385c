"""Reading (image, caption) pairs: WebDataset shards, image folders, lists; the concept split."""
import gzip
import io
import logging
import re
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import slug_fast.data
from slug_fast.data import (Pairs, Skipped, concept_pattern, decode_image, label_by_class, pairs_from,
                            read_image_folder, read_source, read_webdataset, shard, split_by_concept,
                            split_by_concepts)
from slug_fast.errors import SlugError


def random_image(rng, size=(12, 10)):
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def encoded(image, fmt):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def write_tar(path, members):
    """A tar with members [(name, bytes)], in order (as img2dataset writes them)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(int(torch.randint(0, 2**31, ()).item()))


def test_webdataset_reads_every_format_and_skips_what_does_not_decode(tmp_path, rng):
    png, webp, jpg = random_image(rng), random_image(rng), random_image(rng)
    good_jpeg = encoded(jpg, "JPEG")
    members = [
        ("000000000.png", encoded(png, "PNG")), ("000000000.txt", "A photo of Ann.".encode()),
        ("000000000.json", b'{"caption": "ignored: the txt wins"}'),
        ("000000001.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg at all"), ("000000001.txt", b"corrupt"),
        ("000000002.webp", encoded(webp, "WEBP")), ("000000002.json", b'{"caption": " Zo\xc3\xab at work "}'),
        ("000000003.jpg", good_jpeg[:len(good_jpeg) // 2]), ("000000003.txt", b"truncated"),
        ("000000004.jpg", good_jpeg), ("000000004.txt", b"no image problem here"),
        ("000000005.jpg", good_jpeg),  # no caption
        ("000000006.txt", b"caption without an image"),
    ]
    shard = write_tar(tmp_path / "00000.tar", members)
    pairs = read_webdataset(shard)
    assert isinstance(pairs, Pairs) and len(pairs) == 3
    assert pairs.captions == ["A photo of Ann.", "Zoë at work", "no image problem here"]
    assert all(im.mode == "RGB" for im, _ in pairs)
    assert np.array_equal(np.asarray(pairs[0][0]), np.asarray(png))  # lossless formats round-trip exactly
    assert np.array_equal(np.asarray(pairs[1][0]), np.asarray(webp))
    assert pairs[2][0].size == jpg.size
    assert pairs.undecodable == 2
    assert {s.key for s in pairs.skipped if s.kind == "undecodable"} == {"00000.tar:000000001.jpg",
                                                                           "00000.tar:000000003.jpg"}
    assert pairs.skip_counts() == {"undecodable": 2, "incomplete": 2}


def test_decode_image_converts_to_the_mode_asked_for(tmp_path, rng):
    gray = Image.fromarray(rng.integers(0, 256, (6, 5), dtype=np.uint8), "L")
    data = encoded(gray, "PNG")
    default = decode_image(data)  # RGB unless told otherwise
    assert default.mode == "RGB" and np.array_equal(np.asarray(default), np.asarray(gray.convert("RGB")))
    color = random_image(rng)
    color.save(tmp_path / "c.png")
    as_l = decode_image(tmp_path / "c.png", mode="L")
    assert as_l.mode == "L" and np.array_equal(np.asarray(as_l), np.asarray(color.convert("L")))
    palette = color.convert("P")
    kept = decode_image(encoded(palette, "PNG"), mode=None)  # no mode: the file's own
    assert kept.mode == "P" and np.array_equal(np.asarray(kept), np.asarray(palette))


def test_webdataset_captions_skips_and_modes(tmp_path, rng):
    """Known answers for each way a sample is incomplete, undecodable UTF-8 captions, and `mode`."""
    gray = Image.fromarray(rng.integers(0, 256, (7, 4), dtype=np.uint8), "L")
    image = encoded(gray, "PNG")
    members = [
        ("0.png", image), ("0.txt", b"caf\xe9 au lait"),  # Latin-1, not UTF-8: replaced, not fatal
        ("1.png", image), ("1.json", b'{"caption": 5}'),
        ("2.png", image), ("2.json", b'{"url": "https://example.com/2.jpg"}'),
        ("3.png", image), ("3.json", b'["a list"]'),
        ("4.png", image), ("4.json", b"{not json"),
        ("5.txt", b"a caption without an image"),
        ("6.png", image), ("6.txt", b"  \n "),
        ("7.png", image), ("7.json", b'{"caption": "  from the json  "}'),
    ]
    shard = write_tar(tmp_path / "s.tar", members)
    pairs = read_webdataset(shard)
    assert pairs.captions == ["caf\ufffd au lait", "from the json"]
    assert all(im.mode == "RGB" and np.array_equal(np.asarray(im), np.asarray(gray.convert("RGB"))) for im, _ in pairs)
    no_caption, no_image = "no caption (txt or json 'caption')", "no image (jpg/jpeg/png/webp)"
    assert pairs.skipped == tuple(Skipped(f"s.tar:{k}", "incomplete", no_image if k == "5" else no_caption)
                                  for k in "123456")
    assert pairs.source == str(shard)
    as_l = read_webdataset(shard, mode="L")
    assert all(im.mode == "L" and np.array_equal(np.asarray(im), np.asarray(gray)) for im, _ in as_l)


def test_webdataset_brace_patterns_directories_and_limit(tmp_path, rng):
    for part in range(2):
        write_tar(tmp_path / f"part-{part:05d}.tar",
                  [m for i in range(3) for m in ((f"{i:04d}.png", encoded(random_image(rng), "PNG")),
                                                 (f"{i:04d}.txt", f"shard {part} item {i}".encode()))])
    expected = [f"shard {s} item {i}" for s in range(2) for i in range(3)]
    assert read_webdataset(str(tmp_path / "part-{00000..00001}.tar")).captions == expected
    assert read_webdataset(tmp_path).captions == expected
    assert read_webdataset([tmp_path / "part-00001.tar"]).captions == expected[3:]
    assert read_webdataset(str(tmp_path / "part-{00000..00001}.tar"), limit=4).captions == expected[:4]
    assert read_webdataset(tmp_path, limit=3).captions == expected[:3]  # stops at the end of the first shard
    assert read_webdataset(tmp_path, limit=1).captions == expected[:1]
    assert read_webdataset(tmp_path).source == f"2 shards ({tmp_path / 'part-00000.tar'} ...)"
    assert read_webdataset(tmp_path / "part-00001.tar").source == str(tmp_path / "part-00001.tar")


def test_webdataset_file_urls_torchrun_and_dataloader_workers_read_every_sample(tmp_path, rng, monkeypatch):
    for part in range(2):
        write_tar(tmp_path / f"part-{part:05d}.tar",
                  [m for i in range(2) for m in ((f"{i:04d}.png", encoded(random_image(rng), "PNG")),
                                                 (f"{i:04d}.txt", f"shard {part} item {i}".encode()))])
    expected = [f"shard {s} item {i}" for s in range(2) for i in range(2)]
    pattern = str(tmp_path / "part-{00000..00001}.tar")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no warning per shard (webdataset warns on an unset shardshuffle)
        assert read_webdataset(pattern).captions == expected
    # file: URLs, as webdataset takes them: file:///abs, file:/abs, and file://rel (relative to the cwd)
    assert read_webdataset("file://" + pattern).captions == expected
    assert read_webdataset("file:" + pattern).captions == expected
    monkeypatch.chdir(tmp_path)
    assert read_webdataset("file://part-{00000..00001}.tar").captions == expected
    # under torchrun (RANK/WORLD_SIZE) and in a DataLoader worker every process reads every sample:
    # splitting the pairs among processes is `shard`'s job, not the reader's
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("WORKER", "1")
    monkeypatch.setenv("NUM_WORKERS", "2")
    assert read_webdataset(pattern).captions == expected


def test_webdataset_bad_input_is_a_clear_error(tmp_path, rng):
    empty = write_tar(tmp_path / "empty.tar", [])
    with pytest.raises(SlugError, match=re.escape("empty.tar holds no samples; expected img2dataset layout: "
                                                  "KEY.jpg (or png/webp) + KEY.txt")):
        read_webdataset(empty)
    broken = write_tar(tmp_path / "broken.tar", [("0.jpg", b"garbage"), ("0.txt", b"x"),
                                                 ("1.png", b"more garbage"), ("1.txt", b"y")])
    with pytest.raises(SlugError, match="broken.tar: no usable pair, everything was skipped \\(2 undecodable; "
                                        "e.g. broken.tar:0.jpg: undecodable image"):
        read_webdataset(broken)
    write_tar(tmp_path / "some-00001.tar", [])
    with pytest.raises(SlugError, match=r"2 of 3 shards not found \(from .*\): .*some-00000.tar, .*some-00002.tar"):
        read_webdataset(str(tmp_path / "some-{00000..00002}.tar"))
    with pytest.raises(SlugError, match=r"^1 of 2 shards not found: .*some-00000.tar$"):  # a list: no "(from ...)"
        read_webdataset([tmp_path / "some-00001.tar", tmp_path / "some-00000.tar"])
    with pytest.raises(SlugError, match="not a local file"):
        read_webdataset("https://example.com/shard-00000.tar")
    with pytest.raises(SlugError, match="not a local file"):  # URL schemes are case-insensitive
        read_webdataset("HTTP://example.com/shard-00000.tar")
    with pytest.raises(SlugError, match=r"^2 of 2 shards not found"):  # Windows drive letters are no URL scheme
        read_webdataset(["C:/shards/00000.tar", "d:\\shards\\00001.tar"])
    (tmp_path / "notatar.tar").write_bytes(b"\x00\x01 definitely not a tar archive" * 40)
    with pytest.raises(SlugError, match="no usable pair, everything was skipped \\(1 unreadable; e.g. .*notatar.tar: "
                                        "not a readable WebDataset tar file \\(invalid header\\)\\);"):
        read_webdataset(tmp_path / "notatar.tar")
    (tmp_path / "none").mkdir()
    with pytest.raises(SlugError, match="holds no .tar shards"):
        read_webdataset(tmp_path / "none")


def test_a_read_error_without_a_message_is_reported_by_its_type(tmp_path, rng, monkeypatch):
    members = [("0.png", encoded(random_image(rng, (8, 8)), "PNG")), ("0.txt", b"item")]
    shard = write_tar(tmp_path / "shard.tar", members)

    def failing(sample):
        raise OSError()  # as a file system may raise mid-read: no args
    monkeypatch.setattr(slug_fast.data, "_caption_of", failing)
    with pytest.raises(SlugError, match=r"shard.tar: not a readable WebDataset tar file \(OSError\)\)"):
        read_webdataset(shard)


def test_a_truncated_shard_keeps_what_it_yielded_and_the_run_goes_on(tmp_path, rng):
    members = [m for i in range(6) for m in ((f"{i:04d}.png", encoded(random_image(rng, (64, 64)), "PNG")),
                                             (f"{i:04d}.txt", f"item {i}".encode()))]
    whole = write_tar(tmp_path / "whole.tar", members).read_bytes()
    (tmp_path / "a-cut.tar").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "b-whole.tar").write_bytes(whole)
    pairs = read_webdataset(str(tmp_path / "{a-cut,b-whole}.tar"))
    cut = pairs.captions[:len(pairs) - 6]
    assert 0 < len(cut) < 6 and cut == [f"item {i}" for i in range(len(cut))]
    assert pairs.captions[len(cut):] == [f"item {i}" for i in range(6)]
    assert [(s.key, s.kind) for s in pairs.skipped] == [(str(tmp_path / "a-cut.tar"), "unreadable")]


def test_a_shard_cut_at_a_member_boundary_is_recorded_as_truncated(tmp_path, rng):
    """Without tar's end-of-archive blocks a shard cut between samples is not a shorter valid one."""
    members = [m for i in range(4) for m in ((f"{i:04d}.png", encoded(random_image(rng, (16, 16)), "PNG")),
                                             (f"{i:04d}.txt", f"item {i}".encode()))]
    whole = write_tar(tmp_path / "whole.tar", members)
    with tarfile.open(whole) as tar:
        boundary = tar.getmembers()[4].offset  # the header of sample 2's image
    (tmp_path / "cut.tar").write_bytes(whole.read_bytes()[:boundary])
    pairs = read_webdataset(tmp_path / "cut.tar")
    assert pairs.captions == ["item 0", "item 1"]
    assert [(s.key, s.kind) for s in pairs.skipped] == [(str(tmp_path / "cut.tar"), "unreadable")]
    assert pairs.skipped[0].detail == ("truncated: the shard ends without tar's end-of-archive blocks, so samples "
                                       "after the last one read may be missing")
    assert read_webdataset(whole).skipped == ()  # the whole shard: nothing skipped
    with tarfile.open(whole) as tar:
        for _ in tar:
            pass
        end = tar.offset  # where the end-of-archive blocks start
    # a writer that does not pad to tar's 10 KiB records ends with exactly the two zero blocks: complete
    (tmp_path / "unpadded.tar").write_bytes(whole.read_bytes()[:end + 1024])
    assert read_webdataset(tmp_path / "unpadded.tar").skipped == ()
    (tmp_path / "one-block.tar").write_bytes(whole.read_bytes()[:end + 1023])
    assert [s.kind for s in read_webdataset(tmp_path / "one-block.tar").skipped] == ["unreadable"]
    # a gzip-compressed shard is whole: its end-of-archive blocks are in the decompressed stream
    (tmp_path / "whole.tar.gz").write_bytes(gzip.compress(whole.read_bytes()))
    pairs = read_webdataset(tmp_path / "whole.tar.gz")
    assert pairs.captions == [f"item {i}" for i in range(4)] and pairs.skipped == ()


def test_image_folder_reads_its_captions_file(tmp_path, rng):
    (tmp_path / "sub").mkdir()
    a, b = random_image(rng), random_image(rng)
    a.save(tmp_path / "a.png")
    b.save(tmp_path / "sub" / "b.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff not really")
    (tmp_path / "captions.tsv").write_text(
        "filename\tcaption\n"
        "# a comment\n"
        "a.png\tAnn\twith a tab inside the caption\n"
        "\n"
        "bad.jpg\tundecodable\n"
        "gone.png\tlisted but missing\n"
        "sub/b.png\t  Elon Musk on stage  \n"
        "a.png\t\n", encoding="utf-8")
    pairs = read_image_folder(tmp_path)
    assert pairs.captions == ["Ann\twith a tab inside the caption", "Elon Musk on stage"]
    assert np.array_equal(np.asarray(pairs[0][0]), np.asarray(a))
    assert np.array_equal(np.asarray(pairs[1][0]), np.asarray(b))
    assert pairs.undecodable == 1
    assert [(s.key, s.kind) for s in pairs.skipped] == [("bad.jpg", "undecodable"), ("gone.png", "missing"),
                                                        ("a.png", "incomplete")]
    assert read_image_folder(tmp_path, limit=1).captions == pairs.captions[:1]


def test_image_folder_captions_file_details(tmp_path, rng, caplog):
    """A BOM (Excel, Notepad), no header, an indented comment, and the skip records with their line numbers."""
    gray = Image.fromarray(rng.integers(0, 256, (5, 3), dtype=np.uint8), "L")
    gray.save(tmp_path / "g.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "captions.tsv").write_text(
        "g.png\tthe first line is a pair\n"
        "   # an indented comment\n"
        "g.png\t \n"
        "filename\tcaption\n"  # a header that is not the first line is an ordinary line
        "gone.png\tlisted but missing\n"
        "bad.png\tundecodable\n"
        "g.png\tlast\n", encoding="utf-8-sig")
    with caplog.at_level(logging.WARNING, logger="slug_fast"):
        pairs = read_image_folder(tmp_path)
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'captions.tsv'}: skipped 1 incomplete, 2 missing, 1 undecodable"]
    assert pairs.captions == ["the first line is a pair", "last"]
    assert all(im.mode == "RGB" and np.array_equal(np.asarray(im), np.asarray(gray.convert("RGB"))) for im, _ in pairs)
    assert pairs.source == str(tmp_path / "captions.tsv")
    assert [(s.key, s.kind, s.detail) for s in pairs.skipped[:3]] == [
        ("g.png", "incomplete", "empty caption on line 3 of captions.tsv"),
        ("filename", "missing", "not found (listed on line 4 of captions.tsv)"),
        ("gone.png", "missing", "not found (listed on line 5 of captions.tsv)")]
    bad = pairs.skipped[3]
    assert (bad.key, bad.kind) == ("bad.png", "undecodable") and bad.detail.startswith("undecodable image (")
    assert len(pairs.skipped) == 4
    as_l = read_image_folder(tmp_path, mode="L")
    assert all(im.mode == "L" and np.array_equal(np.asarray(im), np.asarray(gray)) for im, _ in as_l)
    # only the first line can be the header: a doubled one is an ordinary (here missing) file
    (tmp_path / "doubled.tsv").write_text("Filename\tCaption\nfilename\tcaption\ng.png\tx\n")
    doubled = read_image_folder(tmp_path, captions="doubled.tsv")
    assert doubled.captions == ["x"] and [(s.key, s.kind) for s in doubled.skipped] == [("filename", "missing")]


def test_image_folder_errors(tmp_path):
    with pytest.raises(SlugError, match="captions file .*captions.tsv not found; write one line per image"):
        read_image_folder(tmp_path)
    (tmp_path / "captions.tsv").write_text("# nothing yet\n\n")
    with pytest.raises(SlugError, match="holds no samples"):
        read_image_folder(tmp_path)
    (tmp_path / "captions.tsv").write_text("a.png\tfine\nb.png no tab here\n")
    with pytest.raises(SlugError, match=r"captions.tsv:2: expected 'filename<TAB>caption'"):
        read_image_folder(tmp_path)
    with pytest.raises(SlugError, match="is not a directory"):
        read_image_folder(tmp_path / "captions.tsv")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "captions.tsv").write_text("a.png\t\ngone.png\tmissing\ngone2.png\tmissing too\nbad.png\tbad\n")
    with pytest.raises(SlugError, match=re.escape(  # the counts of each kind, the first 3 skipped, the layout
            ": no usable pair, everything was skipped (1 incomplete, 2 missing, 1 undecodable; e.g. a.png: empty "
            "caption on line 1 of captions.tsv; gone.png: not found (listed on line 2 of captions.tsv); gone2.png: "
            "not found (listed on line 3 of captions.tsv)); list images as 'relative/path.jpg<TAB>caption', "
            "one per line")):
        read_image_folder(tmp_path)


def test_pairs_feed_an_adapter(rng):
    import open_clip

    from slug_fast import digits
    from slug_fast.adapters import get_adapter

    images = [random_image(rng, (16, 16)) for _ in range(5)]
    pairs = pairs_from([(im, f"the digit {digits.DIGIT_NAMES[i]}") for i, im in enumerate(images)])
    preprocess = open_clip.image_transform(8, is_train=False)
    adapter = get_adapter(digits.build_model(0), tokenizer=digits.tokenizer(), preprocess=preprocess)
    batches = adapter.make_batches(pairs, 2)
    assert [tuple(p.shape) for p, _ in batches] == [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)]
    assert torch.equal(batches[2][1], digits.tokenize(["the digit four"]))
    with pytest.raises(SlugError, match="item 1: the caption is 3"):
        pairs_from([(images[0], "ok"), (images[1], 3)])
    with pytest.raises(SlugError, match="item 0: the image is str"):
        pairs_from([("image.jpg", "caption")])


def test_pairs_from_checks_each_item():
    image = torch.zeros(3, 2, 2)
    pairs = pairs_from([(image, "a"), [image, "b"]])
    assert pairs.captions == ["a", "b"] and pairs.source == "the pair list" and pairs.skipped == ()
    assert pairs_from(pairs) is pairs
    assert Pairs([(image, "a")]).source == "memory"
    with pytest.raises(SlugError, match=r"item 1 is a tuple; expected an \(image, caption\) pair"):
        pairs_from([(image, "a"), (image, "b", "c")])
    with pytest.raises(SlugError, match=r"item 0: the image is a tensor of shape \(2, 2\); expected a PIL image"):
        pairs_from([(torch.zeros(2, 2), "a")])
    with pytest.raises(SlugError, match=re.escape("the pair list holds no samples; pass a non-empty list of "
                                                  "(image, caption) pairs")):
        pairs_from([])


CAPTIONS = {  # caption -> mentions "Ann" (by hand)
    "Ann at the beach": True,
    "a photo of ann.": True,
    "ANN's new dog": True,
    "(Ann) and friends": True,
    "ann,bob and carl": True,
    "Annual report 2020": False,
    "Joanne smiling": False,
    "Anna and Hanna": False,
    "planning a banner": False,
    "Ann_Smith_01.jpg": False,  # an underscore joins words
}


def test_split_by_concept_matches_whole_words_in_any_case():
    image = torch.zeros(3, 2, 2)
    pairs = [(image, c) for c in CAPTIONS]
    forget, retain = split_by_concept(pairs, "Ann")
    assert (forget.source, retain.source) == ("the pair list mentioning 'Ann'", "the pair list not mentioning 'Ann'")
    assert forget.captions == [c for c, hit in CAPTIONS.items() if hit]
    assert retain.captions == [c for c, hit in CAPTIONS.items() if not hit]

    musk = {"Elon Musk on stage": True, "photo of elon\nmusk!": True, "ELON  MUSK, 2019": True,
            "Musk ox in the snow": False, "Elon Muskrat": False, "Elon's car": False, "elon-musk": False}
    forget, retain = split_by_concept([(image, c) for c in musk], "Elon Musk")
    assert forget.captions == [c for c, hit in musk.items() if hit]
    aliases = split_by_concept([(image, c) for c in musk], ["Elon Musk", "Musk"]).forget.captions
    assert aliases == ["Elon Musk on stage", "photo of elon\nmusk!", "ELON  MUSK, 2019", "Musk ox in the snow",
                       "elon-musk"]
    assert concept_pattern("C++").search("I write C++ daily") and not concept_pattern("C++").search("C++17")
    assert concept_pattern(".NET").search("built on .NET.") and not concept_pattern(".NET").search("x.NET")


def test_split_by_concept_errors():
    image = torch.zeros(3, 2, 2)
    pairs = [(image, "Annual report"), (image, "Joanne smiling")]
    with pytest.raises(SlugError, match="mentions 'Ann' as a whole word .*only inside other words, e.g. 'Annual"):
        split_by_concept(pairs, "Ann")
    with pytest.raises(SlugError, match="no caption among 2 pairs .*mentions 'Zed'"):
        split_by_concept(pairs, "Zed")
    with pytest.raises(SlugError, match="every one of the 2 captions mentions 'Joanne' / 'Annual'"):
        split_by_concept(pairs, ["Joanne", "Annual"])
    with pytest.raises(SlugError, match="concept must be a non-empty name"):
        split_by_concept(pairs, "  ")
    # the examples quoted are cut: the first caption found inside words at 80 characters, else 3 captions at 60
    long = "Annual " + "report " * 20
    with pytest.raises(SlugError, match=re.escape(f"e.g. {long[:80]!r}; check the spelling")):
        split_by_concept([(image, long), (image, "b")], "Ann")
    captions = ["x" * 70, "b", "c", "d"]
    with pytest.raises(SlugError, match=re.escape(f"; e.g. captions: {'x' * 60!r}, 'b', 'c'; check the spelling")):
        split_by_concept([(image, c) for c in captions], "Zed")


def test_split_by_concepts_gives_each_concept_its_mentions_and_retains_the_rest():
    image = torch.zeros(3, 2, 2)
    captions = ["Ann at home", "Musk and Ann", "Elon Musk talks", "a dog", "a cat", "Annual report"]
    forgets, retain = split_by_concepts([(image, c) for c in captions], {"Ann": (), "Elon Musk": ("Musk",)})
    assert forgets["Ann"].captions == ["Ann at home", "Musk and Ann"]  # a caption naming both is in both
    assert forgets["Elon Musk"].captions == ["Musk and Ann", "Elon Musk talks"]
    assert retain.captions == ["a dog", "a cat", "Annual report"]  # and never retained
    assert retain.source == "the pair list mentioning none of 'Ann', 'Elon Musk'"
    assert split_by_concepts([(image, c) for c in captions], ["Ann", "dog"])[1].captions == ["Elon Musk talks",
                                                                                            "a cat", "Annual report"]
    with pytest.raises(SlugError, match="no caption among 6 pairs .*mentions 'Zed'"):
        split_by_concepts([(image, c) for c in captions], ["Ann", "Zed"])
    with pytest.raises(SlugError, match="every one of the 2 captions mentions one of 'Ann', 'dog'"):
        split_by_concepts([(image, "Ann"), (image, "a dog")], ["Ann", "dog"])


def test_label_by_class_keeps_captions_naming_exactly_one_class():
    pairs = [("i0", "a photo of a Cat"), ("i1", "a dog and a cat"), ("i2", "Catalog: one bird"), ("i3", "a DOG"),
             ("i4", "a bird, a dog, a cat"), ("i5", "dogs"), ("i6", "the bird sings")]
    labelled = label_by_class(pairs, ["cat", "dog", "bird"])
    assert labelled.images == ["i0", "i2", "i3", "i6"]  # "Catalog" is no cat, "dogs" no dog: i2 is a bird
    assert labelled.labels == [0, 2, 1, 2]
    assert labelled.ambiguous == 2  # i1 and i4 name several classes; i5 names none and is not counted
    assert label_by_class([("i", "nothing here")], ["cat"]) == ([], [], 0)


def test_pairs_repr_says_how_many_pairs_from_where_and_what_was_skipped():
    assert repr(Pairs([("a", "x"), ("b", "y")], source="s.tar")) == "Pairs(2 pairs from s.tar, skipped 0)"
    skipped = [Skipped("k1", "undecodable"), Skipped("k2", "missing"), Skipped("k3", "undecodable")]
    assert repr(Pairs([("a", "x")], skipped)) == "Pairs(1 pairs from memory, skipped {'undecodable': 2, 'missing': 1})"


def test_read_source_reads_a_folder_with_captions_else_webdataset_shards(tmp_path, rng):
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(3):
        random_image(rng).save(folder / f"{i}.png")
    (folder / "captions.tsv").write_text("".join(f"{i}.png\tfolder {i}\n" for i in range(3)))
    write_tar(folder / "ignored.tar", [("0.png", encoded(random_image(rng), "PNG")), ("0.txt", b"shard in folder")])
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        write_tar(shards / f"{s}.tar", [m for i in range(2) for m in ((f"{i}.png", encoded(random_image(rng), "PNG")),
                                                                      (f"{i}.txt", f"shard {s} item {i}".encode()))])
    assert read_source(folder).captions == ["folder 0", "folder 1", "folder 2"]  # captions.tsv wins over .tar files
    assert read_source(str(folder), limit=2).captions == ["folder 0", "folder 1"]
    everything = ["shard 0 item 0", "shard 0 item 1", "shard 1 item 0", "shard 1 item 1"]
    assert read_source(shards).captions == everything  # a folder of .tar files, no captions.tsv
    assert read_source(shards, limit=3).captions == everything[:3]
    assert read_source(shards / "1.tar").captions == everything[2:]
    assert read_source(str(shards / "{0..1}.tar"), limit=1).captions == everything[:1]
    with pytest.raises(SlugError, match=r"1 of 1 shards not found .*nowhere"):
        read_source(tmp_path / "nowhere")
    with pytest.raises(SlugError, match="limit must be at least 1"):
        read_source(folder, limit=0)


def test_shard_splits_into_contiguous_blocks_in_rank_order():
    for n in range(13):
        items = [f"item {i}" for i in range(n)]
        for world in range(1, 6):
            blocks = [shard(items, rank, world) for rank in range(world)]
            assert [x for b in blocks for x in b] == items  # disjoint, complete, in order: rank r holds block r
            sizes = [len(b) for b in blocks]
            assert max(sizes) - min(sizes) <= 1
    assert shard((i for i in range(5)), 1, 2) == [2, 3, 4]  # any iterable, as a list
    assert shard(range(7), None, None) == list(range(7))  # torch.distributed not initialised: everything


def test_shard_refuses_bad_ranks():
    for rank, world in ((-1, 2), (2, 2), (3, 2), (0, 0), (0, -1), (1.0, 2), (0, 2.0), ("0", 2)):
        with pytest.raises(SlugError, match="shard needs 0 <= rank < world"):
            shard(range(4), rank, world)
    for rank, world in ((0, None), (None, 1)):
        with pytest.raises(SlugError, match="pass both rank= and world="):
            shard(range(4), rank, world)


def test_shard_defaults_to_torch_distributed(gloo_world, monkeypatch):
    assert shard(range(5)) == list(range(5))  # the one-process group: rank 0 of 1
    monkeypatch.setattr(gloo_world, "get_rank", lambda group=None: 2)
    monkeypatch.setattr(gloo_world, "get_world_size", lambda group=None: 3)
    assert shard(range(7)) == [4, 5, 6]
    assert shard(range(7), 0, 2) == [0, 1, 2]  # given ranks win


def write_labelled_folder(root, rng, layout):
    """root/<class>/<file> from {class: [file names]}; image files hold random PNG or JPEG pixels."""
    written = {}
    for folder, files in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in files:
            path = root / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if name.lower().endswith((".png", ".jpeg", ".jpg")):
                image = random_image(rng)
                path.write_bytes(encoded(image, "PNG" if name.lower().endswith(".png") else "JPEG"))
                written[f"{folder}/{name}"] = decode_image(path)
            else:
                path.write_text("not an image")
    return written


def test_labelled_folder_labels_images_by_their_sorted_class_folder(tmp_path, rng):
    written = write_labelled_folder(tmp_path, rng, {
        "n02": ["b.png", "a.JPEG", "deeper/c.png", "notes.txt", ".hidden.png"],
        "n01": ["z.jpg"],
        "n03_empty": [],
        ".cache": ["x.png"],  # hidden folders are not classes
    })
    (tmp_path / "stray.png").write_bytes((tmp_path / "n01" / "z.jpg").read_bytes())  # not in a class folder
    got = slug_fast.data.read_labelled_folder(tmp_path)
    assert got.class_names == ["n01", "n02", "n03_empty"]
    order = ["n01/z.jpg", "n02/a.JPEG", "n02/b.png", "n02/deeper/c.png"]  # classes, then paths, sorted
    assert [p.relative_to(tmp_path).as_posix() for p in got.images.paths] == order
    assert got.labels == [0, 1, 1, 1]
    assert [(s.key, s.kind) for s in got.skipped] == [("n02/notes.txt", "undecodable")]
    images = got.images[1:3]  # a slice decodes a list
    assert isinstance(images, list) and len(got.images) == 4
    for name, image in zip(order[1:3], images):
        assert np.array_equal(np.asarray(image), np.asarray(written[name]))
    assert np.array_equal(np.asarray(got.images[0]), np.asarray(written["n01/z.jpg"]))

    first = slug_fast.data.read_labelled_folder(tmp_path, per_class=1)
    assert [p.name for p in first.images.paths] == ["z.jpg", "a.JPEG"] and first.labels == [0, 1]


def test_labelled_folder_class_names_from_a_map_a_file_or_a_list(tmp_path, rng):
    root = tmp_path / "val"
    write_labelled_folder(root, rng, {"n01440764": ["a.png"], "n01443537": ["b.png", "c.png"]})
    expected = ["tench", "goldfish, Carassius auratus"]
    read = slug_fast.data.read_labelled_folder
    assert read(root, {"n01443537": expected[1], "n01440764": "tench", "n99": "unused"}).class_names == expected
    assert read(root, expected).class_names == expected  # one name per sorted folder
    tabbed = tmp_path / "map.tsv"
    tabbed.write_text("# wnid<TAB>name\n\nn01440764\ttench\nn01443537\tgoldfish, Carassius auratus\n")
    spaced = tmp_path / "LOC_synset_mapping.txt"
    spaced.write_text("n01440764 tench\nn01443537 goldfish, Carassius auratus\n")
    for path in (tabbed, spaced, str(spaced)):
        got = read(root, path)
        assert got.class_names == expected and got.labels == [0, 1, 1]
    assert slug_fast.data.read_class_map(tabbed) == dict(zip(["n01440764", "n01443537"], expected))


def test_labelled_folder_errors(tmp_path, rng):
    read = slug_fast.data.read_labelled_folder
    root = tmp_path / "val"
    with pytest.raises(SlugError, match="is not a directory"):
        read(root)
    root.mkdir()
    (root / "loose.png").write_bytes(encoded(random_image(rng), "PNG"))
    with pytest.raises(SlugError, match="has no subfolder; put each class's images in a subfolder"):
        read(root)
    write_labelled_folder(root, rng, {"cat": ["readme.txt"], "dog": []})
    with pytest.raises(SlugError, match=r"holds no image in its 2 class folder\(s\) \(1 files are not images\)"):
        read(root)
    write_labelled_folder(root, rng, {"cat": ["a.png"], "dog": ["b.png"]})
    with pytest.raises(SlugError, match="per_class must be at least 1"):
        read(root, per_class=0)
    with pytest.raises(SlugError, match=r"3 class names for the 2 class folders"):
        read(root, ["a", "b", "c"])
    with pytest.raises(SlugError, match=r"the class map names no class for folder\(s\) \['dog'\].*\(1 of 2\)"):
        read(root, {"cat": "tabby"})
    merged = read(root, {"cat": "pet", "dog": "pet"})  # one name, one class (ImageNet names two folders crane)
    assert merged.class_names == ["pet"] and merged.labels == [0, 0]
    bad_maps = {"missing.tsv": None, "empty.tsv": "# nothing\n\n", "twice.tsv": "cat\ttabby\ncat\tkitten\n",
                "noname.tsv": "cat\ttabby\ndog\n", "latin1.tsv": "cat\ttabby\n".encode() + b"dog\tc\xe9\n"}
    messages = {"missing.tsv": "not found", "empty.tsv": "maps no folder", "twice.tsv": ":2: folder 'cat' is mapped twice",
                "noname.tsv": ":2: expected 'folder<TAB>class name'", "latin1.tsv": "is not UTF-8 text"}
    for name, content in bad_maps.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        with pytest.raises(SlugError, match=re.escape(messages[name])):
            read(root, path)


def test_labelled_folder_converts_to_the_mode_asked_rgb_by_default(tmp_path, rng):
    """A grey and an RGBA file come back in RGB by default (FolderImages too), in "L" when asked."""
    (tmp_path / "cat").mkdir()
    grey = Image.fromarray(rng.integers(0, 256, (6, 5), dtype=np.uint8), "L")
    rgba = Image.fromarray(rng.integers(0, 256, (6, 5, 4), dtype=np.uint8), "RGBA")
    grey.save(tmp_path / "cat" / "a.png")
    rgba.save(tmp_path / "cat" / "b.png")
    read = slug_fast.data.read_labelled_folder
    rgb = read(tmp_path).images
    assert [im.mode for im in rgb[:]] == ["RGB", "RGB"]
    assert np.array_equal(np.asarray(rgb[0]), np.asarray(grey.convert("RGB")))
    assert np.array_equal(np.asarray(rgb[1]), np.asarray(rgba.convert("RGB")))
    assert [im.mode for im in slug_fast.data.FolderImages(rgb.paths)[:]] == ["RGB", "RGB"]
    luminance = read(tmp_path, mode="L").images
    assert [im.mode for im in luminance[:]] == ["L", "L"]
    assert np.array_equal(np.asarray(luminance[1]), np.asarray(rgba.convert("L")))


def test_labelled_folder_skips_non_images_anywhere_keeps_per_class_and_says_so(tmp_path, rng, caplog):
    """A non-image sorted before the images does not end its folder; per_class=2 keeps two of three;
    each skipped file is recorded with why, and one warning names the folder and the count."""
    write_labelled_folder(tmp_path, rng, {"cat": ["a.txt", "b.png", "c.png", "d.png"], "dog": ["e.png"]})
    with caplog.at_level(logging.WARNING, logger="slug_fast"):
        got = slug_fast.data.read_labelled_folder(tmp_path)
    assert [p.name for p in got.images.paths] == ["b.png", "c.png", "d.png", "e.png"] and got.labels == [0, 0, 0, 1]
    (skipped,) = got.skipped
    assert skipped.key == "cat/a.txt" and skipped.kind == "undecodable" and skipped.detail.startswith("not an image (")
    assert [r.getMessage() for r in caplog.records] == [f"{tmp_path}: skipped 1 files that are not images"]
    two = slug_fast.data.read_labelled_folder(tmp_path, per_class=2)
    assert [p.name for p in two.images.paths] == ["b.png", "c.png", "e.png"] and two.labels == [0, 0, 1]


def test_class_map_reads_a_byte_order_mark_indented_comments_and_splits_at_the_first_separator(tmp_path):
    path = tmp_path / "map.tsv"
    path.write_bytes("n01\tCaf\u00e9 au lait\n   # an indented comment\nn02\tname\twith a tab\n".encode("utf-8-sig"))
    assert slug_fast.data.read_class_map(path) == {"n01": "Caf\u00e9 au lait", "n02": "name\twith a tab"}
    path.write_text("n03 great white shark\n\t# tabbed comment\n", encoding="utf-8")
    assert slug_fast.data.read_class_map(path) == {"n03": "great white shark"}


def test_labelled_folder_image_damaged_past_its_header_is_named_when_used(tmp_path, rng):
    write_labelled_folder(tmp_path, rng, {"cat": ["a.jpg"]})
    whole = encoded(random_image(rng, (200, 200)), "JPEG")  # the header is a small part of it
    (tmp_path / "cat" / "b.jpg").write_bytes(whole[:len(whole) // 2])  # the header reads, the pixels do not
    got = slug_fast.data.read_labelled_folder(tmp_path)
    assert len(got.images) == 2 and not got.skipped
    got.images[0]
    with pytest.raises(SlugError, match=r"image .*b\.jpg does not decode .*replace it or remove it"):
        got.images[0:2]


def test_utility_set_names_imagenet_folders_with_open_clips_class_names(tmp_path, rng):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from slug_fast.job import utility_set

    wnids = [f"n{i:08d}" for i in range(1000)]  # stand-ins, sorted as ImageNet's are
    for wnid in wnids:
        (tmp_path / wnid).mkdir()
    write_labelled_folder(tmp_path, rng, {wnids[0]: ["a.png"], wnids[999]: ["b.png", "c.png"]})
    got = utility_set(str(tmp_path), "imagenet")
    assert got.class_names == list(dict.fromkeys(IMAGENET_CLASSNAMES))  # the two cranes are one class
    assert [got.class_names[y] for y in got.labels] == [IMAGENET_CLASSNAMES[0]] + [IMAGENET_CLASSNAMES[999]] * 2
    assert utility_set(str(tmp_path), per_class=1).labels == [0, 999]
    (tmp_path / "map.tsv").write_text(f"{wnids[0]}\tfirst\n" + "".join(f"{w}\tclass {w}\n" for w in wnids[1:]))
    assert utility_set(str(tmp_path), f"@{tmp_path / 'map.tsv'}").class_names[:2] == ["first", "class n00000001"]
    with pytest.raises(SlugError, match="2 class names for the 1000 class folders"):
        utility_set(str(tmp_path), "tench, goldfish")


def test_template_list_reads_one_template_a_line_each_with_a_slot(tmp_path):
    from slug_fast.job import template_list

    assert template_list(None, ("a {}.",)) == ["a {}."]
    path = tmp_path / "templates.txt"
    path.write_text("# ours\na photo of a {}.\n\n  itap of a {}.  \n")
    assert template_list(f"@{path}", ()) == ["a photo of a {}.", "itap of a {}."]
    path.write_text("a photo of a {}.\na photo\n")
    with pytest.raises(SlugError, match=r"every template needs a '\{\}'.*\['a photo'\]"):
        template_list(f"@{path}", ())
    path.write_text("# nothing\n")
    with pytest.raises(SlugError, match="got no templates"):
        template_list(f"@{path}", ())
    with pytest.raises(SlugError, match="takes @file"):
        template_list(str(path), ())
    with pytest.raises(SlugError, match="not found"):
        template_list(f"@{tmp_path / 'missing.txt'}", ())
