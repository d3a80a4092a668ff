"""Splits that keep runway shows whole (fgvc.data.splits): the show code read from iDesigner
file names, group-disjoint train/val/test stratified per designer, random splits as before."""

from __future__ import annotations

import random

import pytest

from fgvc.data.splits import (
    group_keys,
    make_split,
    resolve_rule,
    show_code,
    spanning,
    split_by_group,
    split_random,
    summary,
)
from fgvc.errors import ConfigError


@pytest.mark.parametrize("name, code", [
    ("SS11DLR_Bottega_243.png", "SS11"),
    ("FW07DL_Veneta_058.png", "FW07"),
    ("SS08DLR_Chado_HC_0867.png", "SS08-HC"),
    ("HCFW10DLR_Armani_12.png", "HCFW10"),
    ("RS14_Gucci_3.jpg", "RS14"),
    ("PF12DLR_x.png", "PF12"),
    ("bottega veneta/SS11DLR_Bottega_243.png", "SS11"),
    ("Bottega_297.png", None),
    ("BV2_482.png", None),
    ("13455.png", None),
])
def test_show_code_reads_idesigner_season_codes(name, code):
    assert show_code(name) == code


def test_a_pattern_without_a_capture_group_is_refused():
    with pytest.raises(ConfigError, match="no capture group"):
        show_code("SS11_a.png", r"^SS\d\d")
    with pytest.raises(ConfigError, match="not a regular expression"):
        make_split(["a"], ["a.png"], "show", 0.2, 0, pattern="(")


def synthetic(seed: int = 0):
    """3 designers: coded shows of 3..30 looks plus a few uncoded files each."""
    rng = random.Random(seed)
    labels, names = [], []
    for d, designer in enumerate(["bottega veneta", "chado", "dolce & gabbana"]):
        for s in range(8 + 3 * d):
            season = rng.choice(["SS", "FW", "HCFW", "RS"]) + f"{s:02d}"
            for k in range(rng.randint(3, 30)):
                labels.append(designer)
                names.append(f"{designer}/{season}DLR_{designer[:5]}_{k:03d}.png")
        for k in range(5):
            labels.append(designer)
            names.append(f"{designer}/{designer[:3]}_{k}.png")
    return labels, names


@pytest.mark.parametrize("test_fraction", [0.0, 0.15])
def test_show_split_keeps_every_show_whole_and_each_designer_near_its_share(test_fraction):
    labels, names = synthetic()
    split = make_split(labels, names, "show", 0.2, seed=3, test_fraction=test_fraction)
    assert split.rule == "show"
    assert not spanning({s: [split.group_of[i] for i in m] for s, m in split.members.items()})
    assert sorted(i for m in split.members.values() for i in m) == list(range(len(labels)))
    for designer in set(labels):
        n = labels.count(designer)
        for name, fraction in (("val", 0.2), ("test", test_fraction)):
            if not fraction:
                assert name not in split.members
                continue
            share = sum(labels[i] == designer for i in split.members[name]) / n
            # tolerance: whole shows of up to 30 looks against ~150-300 looks per designer
            assert abs(share - fraction) <= 0.05, (designer, name, share)
        assert any(labels[i] == designer for i in split.members["train"])


def test_uncoded_files_are_each_their_own_group_and_counted():
    labels, names = synthetic()
    keys, coded = group_keys(labels, names)
    uncoded = [k for k, n in zip(keys, names, strict=True) if show_code(n) is None]
    assert len(uncoded) == 15 and len(set(uncoded)) == 15 and coded == len(labels) - 15
    assert keys[0].startswith("bottega veneta/")  # scoped to the designer
    record = summary(make_split(labels, names, "show", 0.2, 0), labels, "p")
    assert record["uncoded_files"] == 15 and record["coded_files"] == len(labels) - 15
    assert record["groups_in_two_splits"] == 0
    assert set(record["groups_per_designer"]) == set(labels)
    assert all(v["val"] >= 1 and v["train"] >= 1 for v in record["groups_per_designer"].values())


def test_the_same_show_code_of_two_designers_is_two_groups():
    labels = ["a"] * 4 + ["b"] * 4
    names = ["SS11_1.png", "SS11_2.png", "FW12_1.png", "FW12_2.png"] * 2
    keys, _ = group_keys(labels, names)
    assert len(set(keys)) == 4


def test_a_designer_with_two_shows_keeps_one_on_each_side():
    labels = ["a"] * 20
    names = [f"SS11_{k}.png" for k in range(18)] + ["FW12_0.png", "FW12_1.png"]
    split = make_split(labels, names, "show", 0.05, 0)
    assert len(split.members["val"]) == 2 and len(split.members["train"]) == 18


def test_one_show_stays_in_train():
    split = make_split(["a"] * 5, [f"SS11_{k}.png" for k in range(5)], "show", 0.5, 0)
    assert split.members["val"] == [] and len(split.members["train"]) == 5


def test_a_given_group_column_wins_over_the_name():
    labels = ["a"] * 6
    names = [f"SS11_{k}.png" for k in range(6)]
    split = make_split(labels, names, "show", 0.5, 0, given=["x", "x", "y", "y", "z", "z"])
    assert len(split.groups("val")) >= 1 and not split.groups("val") & split.groups("train")


def test_auto_is_show_when_most_files_carry_a_code():
    assert resolve_rule("auto", 51, 100) == "show" and resolve_rule("auto", 50, 100) == "random"
    labels, names = synthetic()
    assert make_split(labels, names, "auto", 0.2, 0).rule == "show"
    plain = [n.rsplit("/", 1)[0] + f"/{k}.png" for k, n in enumerate(names)]
    assert make_split(labels, plain, "auto", 0.2, 0).rule == "random"


def test_random_split_matches_the_stratified_counts_and_leaks_shows():
    labels, names = synthetic()
    split = make_split(labels, names, "random", 0.2, 0, test_fraction=0.1)
    for designer in set(labels):
        n = labels.count(designer)
        assert sum(labels[i] == designer for i in split.members["val"]) == round(n * 0.2 + 1e-9)
    assert spanning({s: [split.group_of[i] for i in m] for s, m in split.members.items()})
    plain = split_random(labels, names, 0.2, 0)
    assert plain.members["val"] == make_split(labels, names, "random", 0.2, 0).members["val"]


def test_the_split_depends_on_names_and_seed_only():
    labels, names = synthetic()
    keys, _ = group_keys(labels, names)
    a = split_by_group(labels, names, keys, 0.2, seed=1)
    order = list(range(len(labels)))
    random.Random(0).shuffle(order)
    b = split_by_group([labels[i] for i in order], [names[i] for i in order], [keys[i] for i in order], 0.2, seed=1)
    assert sorted(names[i] for i in a.members["val"]) == sorted(names[order[i]] for i in b.members["val"])
    c = split_by_group(labels, names, keys, 0.2, seed=2)
    assert a.groups("val") != c.groups("val")


def counts_of(split, labels, designer):
    return {s: sum(labels[i] == designer for i in m) for s, m in split.members.items()}


def test_a_test_fraction_never_empties_val_of_a_designer_with_two_shows():
    """Two shows and a test fraction: test takes nothing, val keeps a show, train the other."""
    labels = ["a"] * 20
    names = [f"SS11_{k}.png" for k in range(18)] + ["FW12_0.png", "FW12_1.png"]
    split = make_split(labels, names, "show", 0.2, 0, test_fraction=0.1)
    assert counts_of(split, labels, "a") == {"train": 18, "val": 2, "test": 0}


@pytest.mark.parametrize("seed", range(4))
def test_three_shows_and_a_test_fraction_give_one_show_to_each_split(seed):
    labels = ["a"] * 30
    names = [f"{code}_{k}.png" for code in ("SS11", "FW12", "RS13") for k in range(10)]
    split = make_split(labels, names, "show", 0.1, seed, test_fraction=0.1)
    assert counts_of(split, labels, "a") == {"train": 10, "val": 10, "test": 10}
    assert all(len(split.groups(s)) == 1 for s in ("train", "val", "test"))


def test_designers_with_one_show_are_named_in_the_summary():
    labels = ["solo"] * 5 + ["duo"] * 6 + ["couture"] * 3
    names = ([f"SS11_{k}.png" for k in range(5)] + [f"FW12_{k}.png" for k in range(3)]
             + [f"RS13_{k}.png" for k in range(3)] + [f"PF14_{k}.png" for k in range(3)])
    split = make_split(labels, names, "show", 0.3, 0)
    assert split.single_group_designers == ["couture", "solo"]
    assert summary(split, labels, "p")["single_group_designers"] == ["couture", "solo"]
    assert counts_of(split, labels, "solo")["val"] == 0 and counts_of(split, labels, "duo")["val"] == 3


@pytest.mark.parametrize("given", ["ss11", "SS11", " ss11 ", "_ss11-", "Ss11"])
def test_a_given_group_is_normalised_like_a_show_code_of_a_name(given):
    """One show, one key: `ss11` from a CSV and `SS11` read from a file name are the same show."""
    keys, coded = group_keys(["a", "a"], ["x.png", "SS11DLR_a_1.png"], given=[given, None])
    assert keys == ["a/SS11", "a/SS11"] and coded == 2


def test_a_given_couture_group_matches_the_code_of_a_couture_name():
    keys, _ = group_keys(["a", "a"], ["x.png", "SS08DLR_Chado_HC_0867.png"], given=["ss08_hc", None])
    assert keys == ["a/SS08-HC", "a/SS08-HC"]


@pytest.mark.parametrize("seed", range(8))
def test_a_test_split_left_few_shows_keeps_its_largest(seed):
    """Shows of 30, 1, 30, 1 and test 0.3 (target 19): val and train keep a show each, so test
    may hold two; it keeps the largest of those it would take (a 30 and a 1), not the two 1s."""
    labels = ["a"] * 62
    names = [f"{code}_{k}.png" for code, size in (("SS11", 30), ("FW12", 1), ("RS13", 30), ("PF14", 1))
             for k in range(size)]
    split = make_split(labels, names, "show", 0.05, seed, test_fraction=0.3)
    assert counts_of(split, labels, "a") == {"train": 30, "val": 1, "test": 31}
