"""The book and the plumbing (README, "Reading order").

The book — nanoalign/*.py, train.py and eval.py — is what a reader reads: the model, the adapters, the alignment
loss, MeTA, batching, scoring and the training step. It imports torch, safetensors, the standard library and
itself. The plumbing — nanoalign/plumbing/ — meets the world (hub, GGUF, tokenizer, run directory, checks, fast
forms) and imports the book, never the reverse. The one door between them is the `if __name__ == "__main__":`
block of train.py and eval.py, which hands the command line to the plumbing's launcher.
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOOK = sorted((ROOT / "nanoalign").glob("*.py")) + [ROOT / "train.py", ROOT / "eval.py"]
BOOK_MODULES = {p.stem for p in (ROOT / "nanoalign").glob("*.py")} - {"__init__"}
ALLOWED = {"torch", "safetensors"}
BOOK_LINES, BOOK_CODE_LINES, TRAIN_LINES = 2600, 1800, 400


def is_main_block(node):
    t = node.test if isinstance(node, ast.If) else None
    return (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in t.comparators))


def imports(path):
    """(line, module) of every import in `path`, relative ones made absolute, the __main__ block left out."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for top in tree.body if is_main_block(top) for n in ast.walk(top)}
    package = list(path.relative_to(ROOT).parent.parts)  # e.g. ["nanoalign", "plumbing"]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[:len(package) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            yield from ((node.lineno, base + "." + a.name if not node.module else base) for a in node.names)


def book_problem(module):
    top = module.split(".")[0]
    if top in ALLOWED or top in sys.stdlib_module_names or top == "__future__":
        return None
    if top == "nanoalign":
        parts = module.split(".")
        if len(parts) == 1 or parts[1] in BOOK_MODULES:
            return None
        return "imports the plumbing"
    return "imports a package outside torch, safetensors and the standard library"


def test_the_book_never_imports_the_plumbing():
    problems = [f"{p.relative_to(ROOT)}:{line}: {mod} ({why})" for p in BOOK for line, mod in imports(p)
                if (why := book_problem(mod))]
    assert not problems, "\n".join(problems)


def test_the_plumbing_imports_the_book():
    """The direction is one way: the plumbing uses the book (otherwise the split says nothing)."""
    uses = {mod for p in (ROOT / "nanoalign" / "plumbing").glob("*.py") for _, mod in imports(p)}
    assert any(m.startswith("nanoalign.") and m.split(".")[1] in BOOK_MODULES for m in uses)


def code_lines(path):
    """Lines that are neither blank, comment nor docstring."""
    src = path.read_text()
    tree = ast.parse(src)
    doc = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            doc.update(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(1 for i, line in enumerate(src.splitlines(), 1)
               if line.strip() and not line.strip().startswith("#") and i not in doc)


def test_the_book_reads_in_an_afternoon():
    lines = sum(len(p.read_text().splitlines()) for p in BOOK)
    code = sum(code_lines(p) for p in BOOK)
    train = len((ROOT / "train.py").read_text().splitlines())
    assert lines <= BOOK_LINES and code <= BOOK_CODE_LINES and train <= TRAIN_LINES, \
        f"book {lines} lines (<= {BOOK_LINES}), {code} code lines (<= {BOOK_CODE_LINES}), train.py {train} (<= {TRAIN_LINES})"


def test_the_readme_reading_order_lists_every_file_with_its_length():
    """README's "Reading order" names every book file, then every plumbing file, each once with its `wc -l`, and the
    book's total: the counts a newcomer plans an afternoon by are the files' own."""
    import re
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Reading order\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| (\d+) \|", section, re.M)
    listed = [path for path, _ in rows]
    plumbing = sorted((ROOT / "nanoalign" / "plumbing").glob("*.py"))
    book = {str(p.relative_to(ROOT)) for p in BOOK}
    assert sorted(listed) == sorted(book | {str(p.relative_to(ROOT)) for p in plumbing}) and len(set(listed)) == len(listed)
    assert all(path in book for path in listed[:len(book)]), "the book comes first"
    assert {path: int(n) for path, n in rows} == {path: len((ROOT / path).read_text().splitlines()) for path in listed}
    total = sum(len(p.read_text().splitlines()) for p in BOOK)
    assert f"({total} lines," in section
