"""Train / val / test splits that keep groups whole: looks from one runway show never straddle
two splits.

iDesigner file names start with the show they were shot at: a season code and a two-digit
year (`SS11DLR_Bottega_243.png`, `FW07DL_Veneta_058.png`, `HCFW10DLR_...`; the codes are SS,
FW, RS, PF and HC, alone or combined), and a haute-couture show of the same season carries
`_HC_` further on (`SS08DLR_Chado_HC_0867.png`). Looks from one show share venue, backdrop,
lighting and audience, so a random split lets validation reward remembering the show.

Rules (the pure functions below; `fgvc.data.ingest` and the demo generator use them):

- the group key of a file is what the pattern's capture groups match, joined with "-"
  (`SS11`, `HCFW10`, `SS08-HC`), scoped to the designer (`bottega veneta/SS11`); a CSV may
  give the key in a `group` column instead;
- a file whose name carries no code (`Bottega_297.png`, `BV2_482.png`) is its own group: it
  cannot leak a show it does not name, and it lets the split hit each designer's share;
- a group given in a CSV is written as a show code is (`ss08_hc` -> `SS08-HC`): upper case,
  parts joined with "-", so the same show read from a column and from a name is one group;
- per designer, whole groups go to test, then val, then the rest to train, each aiming at
  `round(n * fraction)` images: groups are taken in a seeded order while they fit under the
  target, then the one group that brings the split nearest to it (so a split is off by at most
  half a show, and uncoded files fill it finely);
- what each designer keeps comes first: one group in train, one in val when it has two or
  more, one in test when it has three or more and a test is asked for. Test never takes the
  groups val and train keep (a designer with two groups has no test); a split left fewer
  groups than it would take keeps the largest of them; a split that must hold a group although
  every group is more than twice its target takes the smallest. So, with val up to 0.4 and
  test up to 0.3, a split of two or more groups stays within half the designer's largest
  group of its target, a split of one group within the largest group (the tolerance
  tests/test_splits_properties.py checks; larger fractions leave train too few groups);
- a designer with one group has no val or test (they would leak the show); the split names
  them (`single_group_designers`).

Which groups go where, and the order of images in each split, come from a seeded hash of
names only: the same inputs and seed give the same split on any machine.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

SPLIT_RULES = ("show", "random", "auto")
DEFAULT_GROUP_PATTERN = r"^((?:SS|FW|RS|PF|HC)+\d{2})(?:.*(_HC_))?"
UNCODED_RULE = "a file without a show code is its own group"


def seeded_rank(seed: int, purpose: str, name: str) -> bytes:
    """A pseudo-random sort key for one item, fixed by the seed and its name only."""
    return hashlib.sha256(f"{seed}\0{purpose}\0{name}".encode()).digest()


def split_count(n: int, fraction: float) -> int:
    """Images of one designer that a held-out split aims at: round(n * fraction), halves up."""
    return 0 if fraction <= 0 else math.floor(n * fraction + 0.5)


def val_count(n: int, val_fraction: float) -> int:
    """Images of one designer that go to val in a random split: round(n * val_fraction), halves
    up, keeping at least one in train (n >= 1) and one in val (n >= 2, val_fraction > 0)."""
    if n < 2 or val_fraction <= 0:
        return 0
    return min(n - 1, max(1, split_count(n, val_fraction)))


def compile_pattern(pattern: str) -> re.Pattern:
    from fgvc.errors import ConfigError

    try:
        compiled = re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise ConfigError(f"--group-pattern {pattern!r} is not a regular expression: {e}") from None
    if compiled.groups == 0:
        raise ConfigError(f"--group-pattern {pattern!r} has no capture group (the show key is what the groups match)")
    return compiled


def check_split_arguments(rule: str, pattern: str, val_fraction: float, test_fraction: float) -> None:
    from fgvc.errors import ConfigError

    if rule not in SPLIT_RULES:
        raise ConfigError(f"--split-by {rule!r}: choose one of {', '.join(SPLIT_RULES)}")
    if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ConfigError(f"val_fraction + test_fraction must leave images for train "
                          f"(got {val_fraction} + {test_fraction})")
    compile_pattern(pattern)


def normalise_group(value: str | None) -> str | None:
    """A show key as it is written everywhere: upper case, its parts joined with "-" (`ss11`
    -> `SS11`, `_HC_` -> `HC`, `ss08_hc` -> `SS08-HC`); None for nothing but separators."""
    parts = [part.upper() for part in re.split(r"[\s_-]+", value or "") if part]
    return "-".join(parts) or None


def show_code(file_name: str, pattern: str | re.Pattern = DEFAULT_GROUP_PATTERN) -> str | None:
    """The show a file name carries (`SS11`, `HCFW10`, `SS08-HC`), or None."""
    compiled = pattern if isinstance(pattern, re.Pattern) else compile_pattern(pattern)
    m = compiled.search(file_name.rsplit("/", 1)[-1])
    if not m:
        return None
    return normalise_group("-".join(g for g in m.groups() if g))


@dataclass
class Split:
    """Indices into the listed items per split, and what the split did."""

    members: dict[str, list[int]]
    rule: str  # "show" or "random"
    group_of: list[str] = field(default_factory=list)  # each item's group key ("" for random)
    coded: int = 0  # items whose group came from a code (or a CSV column)
    single_group_designers: list[str] = field(default_factory=list)  # no val or test: one group only

    def groups(self, split: str) -> set[str]:
        return {self.group_of[i] for i in self.members.get(split, [])} if self.group_of else set()


def _order(members: list[int], names: Sequence[str], seed: int, split: str) -> list[int]:
    return sorted(members, key=lambda i: seeded_rank(seed, f"order/{split}", names[i]))


def split_random(labels: Sequence[str], names: Sequence[str], val_fraction: float, seed: int,
                 test_fraction: float = 0.0) -> Split:
    """Each designer's images shuffled by a seeded hash of their names; the first go to val
    (then test), the rest to train (at least one)."""
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    members: dict[str, list[int]] = {"train": [], "val": []}
    if test_fraction > 0:
        members["test"] = []
    for label in sorted(by_label):
        ranked = sorted(by_label[label], key=lambda i: seeded_rank(seed, "val", names[i]))
        k = val_count(len(ranked), val_fraction)
        t = min(len(ranked) - k - 1, split_count(len(ranked), test_fraction)) if test_fraction > 0 else 0
        t = max(0, t)
        members["val"] += ranked[:k]
        if test_fraction > 0:
            members["test"] += ranked[k:k + t]
        members["train"] += ranked[k + t:]
    return Split({s: _order(m, names, seed, s) for s, m in members.items()}, "random")


def group_keys(labels: Sequence[str], names: Sequence[str], pattern: str = DEFAULT_GROUP_PATTERN,
               given: Sequence[str | None] | None = None) -> tuple[list[str], int]:
    """Each item's group key scoped to its designer, and how many came from a code or a given
    group (the others are their own group, keyed by their name)."""
    compiled = compile_pattern(pattern)
    keys, coded = [], 0
    for i, (label, name) in enumerate(zip(labels, names, strict=True)):
        code = normalise_group(given[i]) if given is not None else None
        code = code or show_code(name, compiled)
        coded += code is not None
        keys.append(f"{label}/{code}" if code is not None else f"{label}/file:{name}")
    return keys, coded


def _take(groups: list[str], sizes: dict[str, int], target: int, most: int, least: int = 0) -> list[str]:
    """Groups (in the given order) that fit under `target`, then the one remaining group that
    brings the total nearest to it, if any does; of those at most `most` (the largest), and at
    least `least` groups (the smallest remaining ones, when too few were taken)."""
    taken, total = [], 0
    for g in groups:
        if total + sizes[g] <= target:
            taken.append(g)
            total += sizes[g]
    chosen = set(taken)
    rest = [g for g in groups if g not in chosen]
    if rest:
        best = min(rest, key=lambda g: abs(total + sizes[g] - target))
        if abs(total + sizes[best] - target) < abs(total - target):
            taken.append(best)
            rest.remove(best)
    if len(taken) > most:
        kept = set(sorted(taken, key=lambda g: -sizes[g])[:max(0, most)])
        rest += [g for g in taken if g not in kept]
        taken = [g for g in taken if g in kept]
    for g in sorted(rest, key=lambda g: sizes[g])[:max(0, least - len(taken))]:
        taken.append(g)
    return taken


def groups_kept(count: int, split: str, fraction: float) -> int:
    """Groups a designer with `count` groups keeps in `split` whatever the targets: one in
    train; one in val from two groups; one in test from three (when the split is asked for)."""
    if split == "train":
        return 1
    return int(fraction > 0 and count >= (2 if split == "val" else 3))


def split_by_group(labels: Sequence[str], names: Sequence[str], keys: Sequence[str], val_fraction: float,
                   seed: int, test_fraction: float = 0.0, coded: int = 0) -> Split:
    """Whole groups to test / val / train per designer (see the module docstring)."""
    by_label: dict[str, dict[str, list[int]]] = {}
    for i, (label, key) in enumerate(zip(labels, keys, strict=True)):
        by_label.setdefault(label, {}).setdefault(key, []).append(i)
    fractions = {"val": val_fraction, **({"test": test_fraction} if test_fraction > 0 else {})}
    members: dict[str, list[int]] = {"train": [], **{s: [] for s in fractions}}
    single = []
    for label in sorted(by_label):
        groups = by_label[label]
        n = sum(len(v) for v in groups.values())
        sizes = {g: len(v) for g, v in groups.items()}
        free = sorted(groups, key=lambda g: seeded_rank(seed, "group", g))
        if len(groups) == 1:
            single.append(label)
        keep = {s: groups_kept(len(groups), s, f) for s, f in {"train": 1.0, **fractions}.items()}
        chosen: dict[str, list[str]] = {}
        for split in reversed(fractions):  # test first, then val: each leaves what the later ones keep
            later = keep["train"] + (keep["val"] if split == "test" else 0)
            chosen[split] = _take(free, sizes, split_count(n, fractions[split]), len(free) - later, keep[split])
            taken = set(chosen[split])
            free = [g for g in free if g not in taken]
        chosen["train"] = free
        for split, split_groups in chosen.items():
            for g in split_groups:
                members[split] += groups[g]
    return Split({s: _order(m, names, seed, s) for s, m in members.items()}, "show", list(keys), coded, single)


def resolve_rule(rule: str, coded: int, total: int) -> str:
    """`auto` is `show` when most items carry a show code (or a given group), else `random`."""
    if rule == "auto":
        return "show" if total and coded * 2 > total else "random"
    return rule


def make_split(labels: Sequence[str], names: Sequence[str], rule: str, val_fraction: float, seed: int,
               test_fraction: float = 0.0, pattern: str = DEFAULT_GROUP_PATTERN,
               given: Sequence[str | None] | None = None) -> Split:
    """The split under `rule` (show, random or auto); see the module docstring."""
    keys, coded = group_keys(labels, names, pattern, given)
    if resolve_rule(rule, coded, len(labels)) == "show":
        return split_by_group(labels, names, keys, val_fraction, seed, test_fraction, coded)
    split = split_random(labels, names, val_fraction, seed, test_fraction)
    split.group_of, split.coded = keys, coded
    return split


def spanning(group_of: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Groups found in two or more splits: group -> the splits it is in (sorted)."""
    where: dict[str, set[str]] = {}
    for split, keys in group_of.items():
        for key in keys:
            where.setdefault(key, set()).add(split)
    return {g: sorted(s) for g, s in sorted(where.items()) if len(s) > 1}


def summary(split: Split, labels: Sequence[str], pattern: str) -> dict:
    """What meta.json records about a split: the rule, group counts per split and designer,
    coded and uncoded counts, and the groups found in two splits (none under `show`)."""
    per_designer: dict[str, dict[str, int]] = {}
    for name, idx in split.members.items():
        for _group, label in {(split.group_of[i], labels[i]) for i in idx}:
            per_designer.setdefault(label, {s: 0 for s in split.members})[name] += 1
    crossing = spanning({s: [split.group_of[i] for i in m] for s, m in split.members.items()})
    return {
        "by": split.rule,
        "group_pattern": pattern,
        "uncoded_rule": UNCODED_RULE,
        "coded_files": split.coded,
        "uncoded_files": len(labels) - split.coded,
        "groups": {s: len({split.group_of[i] for i in m}) for s, m in split.members.items()},
        "groups_per_designer": dict(sorted(per_designer.items())),
        "groups_in_two_splits": len(crossing),
        "single_group_designers": list(split.single_group_designers),
    }
