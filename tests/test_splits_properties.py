"""Properties of the show-disjoint split (fgvc.data.splits) over random designer/show layouts:
1-6 designers, 1-6 shows each, 1-30 photos per show, val fraction 0.05-0.4, test fraction 0
or 0.05-0.3, any seed."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fgvc.data.splits import make_split

EXAMPLES = 500

layouts = st.lists(st.lists(st.integers(1, 30), min_size=1, max_size=6), min_size=1, max_size=6)
val_fractions = st.floats(0.05, 0.4)
test_fractions = st.one_of(st.just(0.0), st.floats(0.05, 0.3))
seeds = st.integers(0, 2**32 - 1)


def target(n: int, fraction: float) -> int:
    """round(n * fraction), halves up: what a held-out split aims at."""
    return int(n * fraction + 0.5)


def photos(layout: list[list[int]]) -> tuple[list[str], list[str]]:
    """Labels and iDesigner-style names (`SS03DLR_d1_007.png`: show 3 of designer 1)."""
    labels, names = [], []
    for d, shows in enumerate(layout):
        for s, size in enumerate(shows):
            for k in range(size):
                labels.append(f"designer {d}")
                names.append(f"designer {d}/SS{s:02d}DLR_d{d}_{k:03d}.png")
    return labels, names


@settings(max_examples=EXAMPLES, deadline=None)
@given(layouts, val_fractions, test_fractions, seeds)
def test_the_show_split_keeps_shows_whole_every_designer_validated_and_each_split_near_its_share(
        layout, val_fraction, test_fraction, seed):
    """For each designer of n photos whose largest show has L photos, and each held-out split
    of fraction f with target t = round(n * f):

    - no show is in two splits, and every photo is in exactly one split;
    - train keeps a show; val has one when the designer has two or more shows; test has one
      when it has three or more (and a test fraction is given), none when it has two;
    - tolerance: a split holding two or more shows is within L / 2 of t (whole shows are taken
      in a seeded order while they fit under t, then the one show that brings the split
      nearest to t; when the shows val and train keep leave test fewer, its largest are
      kept); a split holding exactly one show is within L of t (it may be a show it must
      keep, though larger than twice its target).
    """
    labels, names = photos(layout)
    split = make_split(labels, names, "show", val_fraction, seed, test_fraction=test_fraction)
    assert split.rule == "show"
    assert set(split.members) == {"train", "val"} | ({"test"} if test_fraction > 0 else set())
    assert sorted(i for m in split.members.values() for i in m) == list(range(len(labels)))
    where: dict[str, set[str]] = {}
    for name, members in split.members.items():
        for i in members:
            where.setdefault(split.group_of[i], set()).add(name)
    assert all(len(splits) == 1 for splits in where.values()), where
    assert split.single_group_designers == [f"designer {d}" for d, shows in enumerate(layout) if len(shows) == 1]

    for d, shows in enumerate(layout):
        designer, n, largest = f"designer {d}", sum(shows), max(shows)
        held = {name: [i for i in members if labels[i] == designer] for name, members in split.members.items()}
        count = {name: len(idx) for name, idx in held.items()}
        show_count = {name: len({split.group_of[i] for i in idx}) for name, idx in held.items()}
        assert show_count["train"] >= 1, (designer, count)
        assert (count["val"] > 0) == (len(shows) >= 2), (designer, count)
        if test_fraction > 0:
            assert (count["test"] > 0) == (len(shows) >= 3), (designer, count)
        for name, fraction in (("val", val_fraction), ("test", test_fraction)):
            if count.get(name):
                off = abs(count[name] - target(n, fraction))
                allowed = largest / 2 if show_count[name] >= 2 else largest
                assert off <= allowed, (designer, shows, name, count, target(n, fraction))
