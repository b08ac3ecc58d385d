"""docs/METHODS.md ships with the code: every `METHODS §N[.M]` citation in the repository names one of its headings.

Checked against the headings themselves (`## N.` and `### N.M` lines of docs/METHODS.md), so renumbering a
section, deleting one, or citing a section that was never written fails here with the file and line of the citation.
In .py files a bare `§N.M` is a METHODS citation too (the code cites nothing else by §); in Markdown files only
`METHODS §N` / `METHODS.md §N` counts. A range `§2.1–2.8` must resolve at both ends.
"""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = REPO / "docs" / "METHODS.md"
HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", re.M)
CITE_PY = re.compile(r"§\s?(\d+(?:\.\d+)*)(?:\s?[–-]\s?(\d+\.\d+))?")
CITE_MD = re.compile(r"METHODS(?:\.md)? §\s?(\d+(?:\.\d+)*)(?:\s?[–-]\s?(\d+\.\d+))?")


def tracked_files():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        files = [REPO / f for f in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist): every file but hidden ones
        files = [p for p in REPO.rglob("*") if not any(part.startswith(".") for part in p.relative_to(REPO).parts)]
    return [f for f in files if f.suffix in (".py", ".md") and f.is_file() and f != METHODS]


def citations(path: Path, text: str):
    """[(path:line, section)] for every section a file cites (both ends of a range)."""
    pattern = CITE_PY if path.suffix == ".py" else CITE_MD
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        for m in pattern.finditer(line):
            where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
            out += [(f"{where}:{i}", s) for s in m.groups() if s]
    return out


def headings(text: str) -> set:
    return set(HEADING.findall(text))


def dangling(files, sections):
    return [(where, s) for f in files for where, s in citations(f, f.read_text(encoding="utf-8")) if s not in sections]


def test_every_citation_names_a_heading():
    """Each `METHODS §N[.M]` in the tracked .py and .md files (about a hundred) has a heading with that number."""
    sections = headings(METHODS.read_text(encoding="utf-8"))
    files = tracked_files()
    found = [c for f in files for c in citations(f, f.read_text(encoding="utf-8"))]
    assert len(found) > 50, f"only {len(found)} citations found: the pattern no longer matches the code's style"
    missing = dangling(files, sections)
    assert not missing, "citations of sections docs/METHODS.md does not have:\n" + "\n".join(
        f"  {where}: §{s}" for where, s in missing)


def test_the_check_catches_a_dangling_citation(tmp_path):
    """The checker is not vacuous: a made-up section, a subsection that does not exist and the bad end of a range are
    reported; existing ones are not."""
    sections = headings(METHODS.read_text(encoding="utf-8"))
    S = "\N{SECTION SIGN}"  # spelled out, so that this file's own text cites nothing
    f = tmp_path / "x.py"
    f.write_text(f'"""See METHODS {S}2.5 and {S}3.7."""\n# METHODS {S}9.9, {S}2.11, {S}2.1–2.12\n')
    assert [s for _, s in dangling([f], sections)] == ["9.9", "2.11", "2.12"]
    md = tmp_path / "x.md"
    md.write_text(f"a {S}9.9 without the word is prose; METHODS {S}42 is a citation\n")
    assert [s for _, s in dangling([md], sections)] == ["42"]


def test_methods_numbering_is_complete():
    """Sections 0-8 exist, every subsection N.M sits under its section N, numbers are unique and in order, and the
    methods of §2 keep their numbers (2.1 LoRA ... 2.10 Align-LoRA), which the code relies on."""
    text = METHODS.read_text(encoding="utf-8")
    nums = HEADING.findall(text)
    assert len(nums) == len(set(nums)), "a section number is used twice"
    assert [n for n in nums if "." not in n] == [str(i) for i in range(9)]
    keys = [tuple(int(x) for x in n.split(".")) for n in nums]
    assert keys == sorted(keys), "sections out of order"
    assert all((k[0],) in keys for k in keys)
    titles = dict(re.findall(r"^### (2\.\d+) (.+)$", text, re.M))
    for n, name in {"2.1": "LoRA", "2.3": "HydraLoRA", "2.5": "R-LoRA", "2.6": "M-LoRA", "2.7": "MTL-LoRA",
                    "2.8": "MultiLoRA", "2.9": "MeTA-LoRA", "2.10": "Align-LoRA"}.items():
        assert titles[n].startswith(name), (n, titles[n])


def test_papers_are_named_with_their_arxiv_ids():
    """The spec names every implemented paper by its arXiv id, so a reader can find the source of each equation."""
    text = METHODS.read_text(encoding="utf-8")
    for arxiv in ("2508.05078", "2510.11598", "2311.11501", "2404.19245", "2502.15455", "2410.09437", "2106.09685"):
        assert arxiv in text, arxiv
