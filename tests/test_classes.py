import json

import pytest

from filterx.io.classes import (
    ClassMatch,
    class_info_for_folders,
    describe_matches,
    imagenet_classes,
    match_classes,
    parse_class_spec,
    preset_entries,
    resolve_classes,
)
from filterx.scorers import ClassInfo


@pytest.fixture(scope="module")
def imagenet_pool():
    return class_info_for_folders([c.wnid for c in imagenet_classes()])


def wnids(found):
    return [c.wnid for c in found]


def test_imagenet_classes_read_in_label_order():
    classes = imagenet_classes()
    assert len(classes) == 1000
    assert classes[0].wnid == "n01440764" and classes[0].names == ("tench", "Tinca tinca")
    assert classes[999].index == 999 and classes[999].name == "toilet tissue"
    assert len({c.wnid for c in classes}) == 1000
    assert imagenet_classes() is classes  # cached


def test_class_info_for_folders_names_imagenet_wnids_and_keeps_other_folders():
    info = class_info_for_folders(["n01440764", "back_pack", "n03793489"])
    assert info == (
        ClassInfo(0, "tench", "n01440764"),
        ClassInfo(1, "back_pack", None),
        ClassInfo(2, "mouse", "n03793489"),
    )
    with pytest.raises(ValueError, match="back_pack"):
        class_info_for_folders(["back_pack", "bike", "back_pack"])


def test_exact_matches_display_name_synonym_and_wnid_case_insensitively(imagenet_pool):
    found = resolve_classes("Coffee_Mug, computer mouse, N02835271, tandem", imagenet_pool)
    # Sorted by index, each class once although "N02835271" and "tandem" name the same one.
    assert wnids(found) == ["n02835271", "n03063599", "n03793489"]
    assert [c.index for c in found] == [444, 504, 673]


def test_exact_match_is_whole_name_only(imagenet_pool):
    with pytest.raises(ValueError, match="unknown class name"):
        resolve_classes("coffee", imagenet_pool)


def test_substring_match_finds_every_class_containing_the_text(imagenet_pool):
    found = resolve_classes("BOTTLE", imagenet_pool, match="substring")
    # corkscrew is "corkscrew, bottle screw".
    assert wnids(found) == [
        "n02823428", "n02877765", "n03109150", "n03937543", "n03983396", "n04557648", "n04591713",
    ]
    # A wnid still means that one class, not every wnid containing the text.
    assert wnids(resolve_classes("n03793489", imagenet_pool, match="substring")) == ["n03793489"]


def test_unknown_name_lists_close_matches_on_one_line(imagenet_pool):
    with pytest.raises(ValueError) as err:
        resolve_classes("coffee mug, mosue", imagenet_pool)
    msg = str(err.value)
    assert "'mosue'" in msg and "'mouse'" in msg and "\n" not in msg
    assert "coffee mug" not in msg  # only the bad entry is reported


def test_ambiguous_name_names_every_candidate_wnid(imagenet_pool):
    with pytest.raises(ValueError) as err:
        resolve_classes("crane", imagenet_pool)
    assert "n02012849" in str(err.value) and "n03126707" in str(err.value)
    with pytest.raises(ValueError, match="n03710637.*n03710721"):
        resolve_classes("maillot", imagenet_pool)
    assert wnids(resolve_classes("n03126707", imagenet_pool)) == ["n03126707"]
    # Substring mode accepts several matches by design.
    assert wnids(resolve_classes("crane", imagenet_pool, match="substring")) == [
        "n02012849", "n03126707",
    ]


def test_file_spec_skips_comments_and_blank_lines(tmp_path, imagenet_pool):
    path = tmp_path / "classes.txt"
    path.write_text("# office things\ncoffee mug\n\n  n03793489  # the computer mouse\nlaptop\n")
    assert parse_class_spec(f"@{path}") == ["coffee mug", "n03793489", "laptop"]
    found = resolve_classes(f"@{path}", imagenet_pool)
    assert wnids(found) == ["n03063599", "n03642806", "n03793489"]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        resolve_classes(f"@{tmp_path / 'missing.txt'}", imagenet_pool)


def test_list_spec_and_empty_spec(imagenet_pool):
    assert parse_class_spec(["coffee mug, laptop", " mouse "]) == ["coffee mug", "laptop", "mouse"]
    with pytest.raises(ValueError, match="names no classes"):
        resolve_classes(" , ", imagenet_pool)
    with pytest.raises(ValueError, match="substring"):
        resolve_classes("laptop", imagenet_pool, match="fuzzy")


OFFICE31_CATEGORIES = (
    "back_pack bike bike_helmet bookcase bottle calculator desk_chair desk_lamp desktop_computer file_cabinet "
    "headphones keyboard laptop_computer letter_tray mobile_phone monitor mouse mug paper_notebook pen phone "
    "printer projector punchers ring_binder ruler scissors speaker stapler tape_dispenser trash_can"
).split()


def test_office31_preset_has_47_unique_classes_each_entry_naming_exactly_one(imagenet_pool):
    rows = preset_entries("office31")
    assert len(OFFICE31_CATEGORIES) == 31
    assert len(rows) == 47
    assert len({r["wnid"] for r in rows}) == 47
    by_wnid = {c.wnid: c for c in imagenet_classes()}
    for row in rows:
        # The wording resolves, as a whole name, to exactly the stored class; for
        # "bicycle-built-for-two / bicycle" the synset name is the first alternative.
        name = row["entry"].split(" / ")[0]
        assert wnids(resolve_classes(name, imagenet_pool)) == [row["wnid"]], row
        assert row["name"] == ", ".join(by_wnid[row["wnid"]].names)
        assert row["office31"] in OFFICE31_CATEGORIES, row
    found = resolve_classes("@office31", imagenet_pool)
    assert sorted(wnids(found)) == sorted(r["wnid"] for r in rows)
    # The preset's "mouse" and "monitor" are the devices, "screen" is the CRT screen.
    picked = {r["entry"]: r["wnid"] for r in rows}
    assert picked["mouse"] == "n03793489"
    assert picked["monitor"] == "n03782006"
    assert picked["screen"] == "n04152593"


def test_office31_preset_holds_the_imagenet_classes_that_are_office31_categories_outright():
    category = {r["wnid"]: r["office31"] for r in preset_entries("office31")}
    assert {w: category.get(w) for w in ("n02747177", "n02769748", "n02783161", "n03337140", "n04118776")} == {
        "n02747177": "trash_can",  # ashcan
        "n02769748": "back_pack",  # backpack
        "n02783161": "pen",  # ballpoint pen
        "n03337140": "file_cabinet",  # file cabinet
        "n04118776": "ruler",  # rule
    }
    # ImageNet's "notebook" is the notebook computer: a laptop, not a paper notebook
    assert category["n03832673"] == "laptop_computer" and category["n03642806"] == "laptop_computer"
    assert [w for w, c in category.items() if c == "paper_notebook"] == ["n06596364"]  # comic book
    # every category ImageNet-1k has a class for is covered; these four it has none for
    assert set(OFFICE31_CATEGORIES) - set(category.values()) == {"punchers", "scissors", "stapler", "tape_dispenser"}


def test_preset_file_is_plain_json_list():
    from importlib.resources import files

    data = json.loads((files("filterx") / "data" / "office31_imagenet.json").read_text())
    assert isinstance(data, list) and all(set(row) == {"entry", "wnid", "name", "office31"} for row in data)
    with pytest.raises(ValueError, match="office31"):
        preset_entries("office32")


def test_non_imagenet_pool_matches_folder_names():
    pool = class_info_for_folders(["back_pack", "bike", "bike_helmet"])
    assert [c.index for c in resolve_classes("Back Pack", pool)] == [0]
    assert [c.index for c in resolve_classes("bike", pool, match="substring")] == [1, 2]
    with pytest.raises(ValueError, match="'bike_helmet'"):
        resolve_classes("bike helmt", pool)


def test_match_classes_reports_what_each_entry_matched(imagenet_pool):
    matches = match_classes("laptop, n03793489", imagenet_pool)
    assert matches == [
        ClassMatch("laptop", (imagenet_pool[620],)),
        ClassMatch("n03793489", (imagenet_pool[673],)),
    ]
    assert describe_matches(matches) == "laptop -> n03642806 (laptop)\nn03793489 (mouse)"
