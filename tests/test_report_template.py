"""The study's HTML report from its template (fgvc/viz/templates/report.html.j2).

tests/data/report_reference.html and report_reference_minimal.html are the report's pages with
the answer first (the headline table and its sentences, the findings, the figures, then the
method notes collapsed in <details>, the setup, the tables, the per-cell figures and the
examples; wide tables shown in column groups). They were written from :func:`reference_input`
and :func:`answer_input` below by this script run from the project root:

    import sys, tempfile
    from pathlib import Path
    sys.path.insert(0, "tests")
    from test_report_template import FINDINGS, answer_input, reference_input
    from fgvc.study.tables import NO_DATA, QUALITY_FACTOR
    from fgvc.viz.report import MethodNotes, build_report
    with tempfile.TemporaryDirectory() as tmp:
        title, setup, tables, figures, examples = reference_input(Path(tmp))
        headline, answer, details = answer_input(Path(tmp))
        Path("tests/data/report_reference.html").write_text(
            build_report(title, setup, tables, figures, examples, notes=FINDINGS,
                         method=MethodNotes(QUALITY_FACTOR, NO_DATA), headline=headline, answer=answer,
                         details=details), encoding="utf-8")
        Path("tests/data/report_reference_minimal.html").write_text(build_report("s", {}, [], [], {}),
                                                                    encoding="utf-8")

(The pages before that layout, from the report as it was first made from a template, are in the
project's history at commit 9374c93.) The template must keep giving the same page apart from
whitespace: the same sequence of text nodes (whitespace collapsed, entities decoded, as a browser
shows them), the same tags with the same attributes in the same order (tables, images with their
inlined data URIs, the verdict cells' classes, greyed rows), and, with whitespace between tags
removed and runs of whitespace collapsed, the same markup.
"""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

from fgvc.study.tables import NO_DATA, QUALITY_FACTOR
from fgvc.viz.report import Example, Table, build_report

DATA = Path(__file__).parent / "data"

# Two 1x1 PNGs (a red and a blue pixel), as bytes, so the inlined data URIs never change.
PNGS = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGO4bqAOAAMQAS92Aq9xAAAAAElFTkSuQmCC",
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGNwLd0CAAJxAW+vBz1dAAAAAElFTkSuQmCC")

# The paragraphs a study adds after the method notes: how attribution and the swap test
# relate, and the show leak.
FINDINGS = (
    "Attribution and the swap tests: of 2 unmasked cells with a masked twin, the swap test says 'reads the runway' "
    "for 1. gradcam's excess over the masked twin lies above 0 in 1 of the 1 cells that read the runway and in 0 of "
    "the 1 others; occlusion's excess over the masked twin lies above 0 in 1 of the 1 cells that read the runway and "
    "in 1 of the 1 others. The verdict rests on the swap test.",
    "Show leak, random split minus show split of the same images (95% unpaired bootstrap intervals): fn-small "
    "unmasked: acc +0.250 [+0.050, +0.450]; BG-gap +0.100 [−0.100, +0.300]. In 1 of 1 the verdict holds only on "
    "the random split (fn-small unmasked: 'reads the runway' there, 'undecided' on the show split): it describes "
    "memorised shows, not the designer.",
)


def reference_input(tmp: Path):
    """(title, setup, tables, figures, examples) of a two-regime study: every kind of cell a
    table holds (key columns, verdicts coloured, greyed rows, legends, notes, no legend), text
    that needs escaping in the title, the setup, captions and cells, figures and example groups
    (one of them empty)."""
    red, blue = tmp / "red.png", tmp / "blue.png"
    for path, png in zip((red, blue), PNGS, strict=True):
        path.write_bytes(base64.b64decode(png))
    title = 'Background-reliance study (quick) <&> "demo"'
    setup = {"study run": "0123456789abcdef", "source data": "data/demo-quick (digest 5f3c) & <masked>",
             "grid": "fn-small × unmasked, masked × seeds 0, 1", "quality gate":
             "accuracy's 95% interval above 1.5 x chance (0.250)", "image size": "48×64 (height × width)",
             "libraries": "torch 2.5.1, mlflow 3.7.0"}
    summary = Table("Summary across 2 seeds",
                    ["arch", "regime", "seeds", "verdict", "did not learn", "test acc, own images", "BG-gap"],
                    [["fn-small", "unmasked", "2", "reads the runway (2/2)", "0", "0.900 ± 0.071 [0.265, 1.535]",
                      "0.300 ± 0.050"],
                     ["fn-small", "masked", "2", "reads the garment (1/2); undecided (1/2)", "0", "0.700 ± 0.100",
                      "–"],
                     ["fn-small", "masked+aug", "2", "no verdict (did not learn) (2/2)", "2", "0.200 ± 0.020", "–"]],
                    key_columns=5, note="Chance level 0.167; reported numbers on the test split <always>.",
                    legend={"test acc, own images": "accuracy on the analysed test images & more",
                            "verdict": "reads the runway: No-FG above chance and BG-gap above 0"},
                    muted=[False, False, True])
    leak = Table("Show leak (random split − show split, the same images)",
                 ["arch", "regime", "seeds", "Δ acc, own images", "verdict, random split", "verdict, show split"],
                 [["fn-small", "unmasked", "1", "+0.250 [+0.050, +0.450]", "reads the runway", "undecided"]],
                 key_columns=3, note="Each cell trained twice on the same images.")
    differences = Table("Paired regime differences (same source images)",
                        ["arch", "comparison", "seeds", "Δ acc, source images", "Δ BG-gap"],
                        [["fn-small", "unmasked − masked", "2", "+0.050 [−0.010, 0.110]", "0.300 [0.100, 0.500]"]],
                        key_columns=3, muted=[False])
    cells = Table("Cells (3)", ["arch", "regime", "seed", "run", "status", "quality", "verdict", "masked twin",
                                "No-FG acc", "gradcam excess vs masked twin"],
                  [["fn-small", "unmasked", "0", "run-a", "trained", "learned",
                    "reads the runway; holds only on the random split", "fn-small-masked-s0", "0.750 [0.550, 0.900]",
                    "0.300 [0.100, 0.500]"],
                   ["fn-small", "masked", "0", "run-b", "reused", "learned", "reads the garment", "",
                    "0.200 [0.050, 0.350]", "–"],
                   ["fn-small", "masked+aug", "0", "run-c", "resumed", NO_DATA, "no verdict (no data)", "", "–", "–"]],
                  key_columns=8, note="Greyed rows did not learn.", muted=[False, False, True],
                  groups=[("the cell", [3, 4, 5, 6, 7]), ("swap test", [8]), ("attribution", [9])], repeat=3)
    figures = [Example("Test accuracy against background reliance, one point per cell", red),
               Example('Per-regime values (error bars: "spread" across seeds)', blue)]
    examples = {"unmasked": [Example("fn-small/unmasked/seed0: gradcam example 1", red),
                             Example("fn-small/unmasked/seed0: occlusion example 1 <wrong>", blue)],
                "masked": [],
                "Background-swap variants (source images)": [Example("Original | Only-FG | No-FG", red)]}
    return title, setup, [summary, leak, differences, cells], figures, examples


def answer_input(tmp: Path):
    """(headline, answer, details) of the same study: the headline table (a verdict of each
    kind, a greyed row), one sentence per unmasked cell, and a group of per-cell figures."""
    red, blue = tmp / "red.png", tmp / "blue.png"
    headline = Table("The answer, one line per cell",
                     ["cell", "verdict", "test acc", "No-FG / chance", "backdrop-follow (chance 0.167)",
                      "masked twin's backdrop-follow", "− twin's (paired)", "instruments"],
                     [["fn-small-unmasked-s0", "reads the runway", "0.900 [0.800, 1.000]", "3.500 [2.250, 4.750]",
                       "0.625 [0.417, 0.833]", "0.125 [0.000, 0.292]", "+0.500 [+0.250, +0.750]",
                       "instruments disagree (gradcam)"],
                      ["fn-small-masked-s0", "reads the garment", "0.700 [0.500, 0.850]", "1.000 [0.250, 1.750]",
                       "0.125 [0.000, 0.292]", "", "", ""],
                      ["fn-small-masked+aug-s0", "no verdict (did not learn)", "0.200 [0.050, 0.350]", "–", "–", "", "",
                       ""]],
                     key_columns=2, note="95% intervals <paired>.", muted=[False, False, True])
    answer = ["fn-small-unmasked-s0 (reads the runway): it names the backdrop's designer in 62 % [42, 83] of 24 swaps; "
              "chance 17 %; its masked twin 12 % [0, 29] (difference +50 points [+25, +75], paired on the same swaps)."]
    details = {"Per designer: the backdrops read most (1 unmasked cells)": [
        Example("fn-small-unmasked-s0: the designers whose backdrops it reads most & its twin", blue)],
               "No-FG confusion (1 unmasked cells)": [Example("fn-small-unmasked-s0: No-FG confusion", red)]}
    return headline, answer, details


class _Page(HTMLParser):
    """A page as a reader and a browser see it: its text nodes (whitespace collapsed, entities
    decoded, empty ones left out) and its tags with their attributes, in document order."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.tags: list[tuple] = []
        self.feed(page)
        self.close()

    def handle_decl(self, decl):
        self.tags.append(("!", " ".join(decl.split())))

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, tuple(attrs)))

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, tuple(attrs)))

    def handle_endtag(self, tag):
        self.tags.append((f"/{tag}",))

    def handle_data(self, data):
        text = " ".join(data.split())
        if text:
            self.text.append(text)


def pages(tmp_path) -> list[tuple[str, str]]:
    """(today's page, the template's page) for the full and the minimal input."""
    from fgvc.viz.report import MethodNotes

    title, setup, tables, figures, examples = reference_input(tmp_path)
    headline, answer, details = answer_input(tmp_path)
    full = build_report(title, setup, tables, figures, examples, notes=FINDINGS,
                        method=MethodNotes(QUALITY_FACTOR, NO_DATA), headline=headline, answer=answer, details=details)
    return [((DATA / "report_reference.html").read_text(encoding="utf-8"), full),
            ((DATA / "report_reference_minimal.html").read_text(encoding="utf-8"), build_report("s", {}, [], [], {}))]


def test_the_page_reads_as_before(tmp_path):
    """Every text node, in order: the method notes with the quality factor and the no-data
    label, the findings, the setup, every table's title, note, cells and legend, captions."""
    for reference, page in pages(tmp_path):
        expected, got = _Page(reference).text, _Page(page).text
        assert got == expected, next((i, a, b) for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b)
    assert "does not clear 1.5 x chance did not learn" in " ".join(_Page(pages(tmp_path)[0][1]).text)


def test_the_page_has_the_same_tags_and_attributes(tmp_path):
    """The same elements with the same attributes: tables (key columns, coloured verdicts,
    greyed rows), images with the same inlined data URIs and alt texts, notes, the style."""
    for reference, page in pages(tmp_path):
        expected, got = _Page(reference).tags, _Page(page).tags
        assert got == expected, next((i, a, b) for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b)
    reference, page = pages(tmp_path)[0]
    images = [dict(t[1])["src"] for t in _Page(page).tags if t[0] == "img"]
    # the figures, the per-cell figures (blue, red), the examples
    assert len(images) == 7 and all(src == f"data:image/png;base64,{PNGS[i]}" for i, src in
                                    zip((0, 1, 1, 0, 0, 1, 0), images, strict=True))
    cells = [dict(t[1]).get("class") for t in _Page(page).tags if t[0] == "td"]
    # the headline's verdicts (key columns) beside the summary's and the cells table's
    assert cells.count("key runway") == 1 + 2 and cells.count("runway") == 1 and cells.count("key garment") == 1 + 2
    # greyed: the headline's row, the summary's, the cells table's in each of its three column groups
    assert sum(t[:2] == ("tr", (("class", "muted"),)) for t in _Page(page).tags) == 1 + 1 + 3
    assert len(re.sub(r"\s+", "", page)) <= len(re.sub(r"\s+", "", reference)) * 1.01  # nothing added


def test_the_answer_comes_first_and_the_method_notes_are_collapsible(tmp_path):
    """The headline table and its sentences open the page, then the findings and the figures;
    the method notes follow inside <details>; a wide table is shown as one table per column
    group, each repeating the key columns; the per-cell figures are collapsible groups."""
    page = pages(tmp_path)[0][1]
    text = " ".join(_Page(page).text)
    order = ["The answer, one line per cell", "it names the backdrop's designer in 62 %", FINDINGS[0][:40], "Figures",
             "Method notes: how the numbers are made", "Does a classifier recognise", "Setup", "Summary across 2 seeds",
             "Cells (3)", "Per designer: the backdrops read most", "Examples"]
    at = [text.index(t) for t in order]
    assert at == sorted(at), list(zip(order, at, strict=True))
    tags = [t[0] for t in _Page(page).tags]
    assert tags.count("details") == 3 and tags.count("summary") == 3  # the method notes and two figure groups
    # the cells table: three tables (the cell, swap test, attribution), each with arch, regime, seed first
    tables = page.split("<h2>Cells (3)</h2>")[1].split("<h2>")[0]
    assert tables.count("<table>") == 3 and "<h3>swap test</h3>" in tables and "<h3>attribution</h3>" in tables
    for part in tables.split("<table>")[1:]:
        assert [h for h in re.findall(r"<th[^>]*>([^<]*)</th>", part)][:3] == ["arch", "regime", "seed"]
    assert "fn-small-unmasked-s0: the designers whose backdrops it reads most &amp; its twin" in page


def test_the_method_notes_quote_the_numbers_passed_in(tmp_path):
    from fgvc.viz.report import MethodNotes

    page = build_report("s", {}, [], [], {}, notes=["finding <b>"], method=MethodNotes(2.0, "no per-image data"))
    text = " ".join(_Page(page).text)
    assert "does not clear 2 x chance did not learn" in text and "(quality 'no per-image data')" in text
    assert "finding <b>" in text and ("b", ()) not in _Page(page).tags  # values are escaped, never markup
    assert "Does a classifier" not in build_report("s", {}, [], [], {})  # no method: no method notes
    assert "<details>" not in build_report("s", {}, [], [], {})


def test_the_template_ships_with_the_package():
    """pyproject's package data names the template, so a wheel carries it."""
    import tomllib

    from fgvc.viz.report import TEMPLATES

    project = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((project / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["fgvc"]
    shipped = {p for pattern in patterns for p in (project / "fgvc").glob(pattern)}
    assert TEMPLATES / "report.html.j2" in shipped
