"""Reading (image, caption) pairs: WebDataset shards, image folders, lists; the concept split."""
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from slug_fast.data import (Pairs, Skipped, concept_pattern, label_by_class, pairs_from, read_image_folder,
                            read_source, read_webdataset, shard, split_by_concept, split_by_concepts)
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


def test_webdataset_bad_input_is_a_clear_error(tmp_path, rng):
    empty = write_tar(tmp_path / "empty.tar", [])
    with pytest.raises(SlugError, match="empty.tar holds no samples"):
        read_webdataset(empty)
    broken = write_tar(tmp_path / "broken.tar", [("0.jpg", b"garbage"), ("0.txt", b"x"),
                                                 ("1.png", b"more garbage"), ("1.txt", b"y")])
    with pytest.raises(SlugError, match="broken.tar: no usable pair, everything was skipped \\(2 undecodable; "
                                        "e.g. broken.tar:0.jpg: undecodable image"):
        read_webdataset(broken)
    write_tar(tmp_path / "some-00001.tar", [])
    with pytest.raises(SlugError, match=r"2 of 3 shards not found \(from .*\): .*some-00000.tar, .*some-00002.tar"):
        read_webdataset(str(tmp_path / "some-{00000..00002}.tar"))
    with pytest.raises(SlugError, match="not a local file"):
        read_webdataset("https://example.com/shard-00000.tar")
    (tmp_path / "notatar.tar").write_bytes(b"\x00\x01 definitely not a tar archive" * 40)
    with pytest.raises(SlugError, match="no usable pair, everything was skipped \\(1 unreadable; e.g. .*notatar.tar: "
                                        "not a readable WebDataset tar file"):
        read_webdataset(tmp_path / "notatar.tar")
    (tmp_path / "none").mkdir()
    with pytest.raises(SlugError, match="holds no .tar shards"):
        read_webdataset(tmp_path / "none")


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
    assert "truncated" in pairs.skipped[0].detail
    assert read_webdataset(whole).skipped == ()  # the whole shard: nothing skipped


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
    with pytest.raises(SlugError, match="the pair list holds no samples"):
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


def test_split_by_concepts_gives_each_concept_its_mentions_and_retains_the_rest():
    image = torch.zeros(3, 2, 2)
    captions = ["Ann at home", "Musk and Ann", "Elon Musk talks", "a dog", "a cat", "Annual report"]
    forgets, retain = split_by_concepts([(image, c) for c in captions], {"Ann": (), "Elon Musk": ("Musk",)})
    assert forgets["Ann"].captions == ["Ann at home", "Musk and Ann"]  # a caption naming both is in both
    assert forgets["Elon Musk"].captions == ["Musk and Ann", "Elon Musk talks"]
    assert retain.captions == ["a dog", "a cat", "Annual report"]  # and never retained
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
