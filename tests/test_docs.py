"""docs/derivations.md and the code cite each other, in both directions.

- every tag cited in a code comment (``(KL.2)``, ``(LIN.2-4)``, ``(LIK.2/4)``, ``(ACT)``)
  is defined in the document;
- every tag defined in the document names the function that implements it (``Code:``)
  and the test that checks it (``Test:``), and both exist;
- every tag defined in the document is cited somewhere in the code.
"""
import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "derivations.md"
CODE = sorted((ROOT / "npvae").rglob("*.py"))

DEFINITION = re.compile(r"^\*\*\(([A-Z]+\.\d+)\)\*\*", re.M)
CITATION = re.compile(r"\(([A-Z]{1,6})(?:\.(\d+)(?:([-/])(\d+))?)?\)")


def doc_entries():
    """{tag: {"code": [...], "test": [...]}} from the document."""
    text = DOC.read_text(encoding="utf-8")
    entries = {}
    matches = list(DEFINITION.finditer(text))
    for m, nxt in zip(matches, matches[1:] + [None]):
        block = text[m.end(): nxt.start() if nxt else len(text)]
        entry = entries.setdefault(m.group(1), {"code": [], "test": []})
        entry["code"] += re.findall(r"^- Code: (.+)$", block, re.M)
        entry["test"] += re.findall(r"^- Test: (.+)$", block, re.M)
    return entries


def code_citations():
    """{tag: [file:line, ...]} for every tag cited in the package's source."""
    families = {t.split(".")[0] for t in doc_entries()}
    cited = {}
    for path in CODE:
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for fam, a, sep, b in CITATION.findall(line):
                if fam not in families and not a:
                    continue  # "(N)" and the like: not a tag
                if not a:
                    tags = [fam]  # a family: "(ACT)"
                elif sep == "-":
                    tags = [f"{fam}.{i}" for i in range(int(a), int(b) + 1)]
                elif sep == "/":
                    tags = [f"{fam}.{a}", f"{fam}.{b}"]
                else:
                    tags = [f"{fam}.{a}"]
                for t in tags:
                    cited.setdefault(t, []).append(f"{path.relative_to(ROOT)}:{lineno}")
    return cited


def split_names(field):
    return [n.strip().strip("`") for n in field.split(",") if n.strip()]


def resolve(dotted):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_every_cited_tag_is_defined():
    defined = doc_entries()
    families = {t.split(".")[0] for t in defined}
    missing = {t: where[:3] for t, where in code_citations().items()
               if t not in defined and t not in families}
    assert not missing, f"tags cited in code but not defined in docs/derivations.md: {missing}"


def test_every_defined_tag_is_cited_in_code():
    cited = code_citations()
    uncited = [t for t in doc_entries() if t not in cited]
    assert not uncited, f"tags defined in docs/derivations.md but cited nowhere in npvae/: {uncited}"


def test_every_tag_names_existing_code_and_test():
    problems = []
    test_functions = {}
    for tag, entry in doc_entries().items():
        if not entry["code"] or not entry["test"]:
            problems.append(f"{tag}: needs both a Code: and a Test: line")
            continue
        for name in split_names(", ".join(entry["code"])):
            try:
                resolve(name)
            except (ImportError, AttributeError):
                problems.append(f"{tag}: code {name} does not exist")
        for name in split_names(", ".join(entry["test"])):
            file, _, func = name.partition("::")
            path = ROOT / file
            if not path.exists():
                problems.append(f"{tag}: test file {file} does not exist")
                continue
            if file not in test_functions:
                tree = ast.parse(path.read_text(encoding="utf-8"))
                test_functions[file] = {n.name for n in ast.walk(tree)
                                        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
            if func not in test_functions[file]:
                problems.append(f"{tag}: test {name} does not exist")
    assert not problems, "\n".join(problems)


def test_the_checker_sees_tags():
    """Guard against a parser that silently finds nothing."""
    assert len(doc_entries()) > 40
    assert "KL.2" in code_citations()


@pytest.mark.parametrize("line, expected", [
    ("x = 1  # (N, Z)  (KL.2)", ["KL.2"]),
    ("# (LIN.2-4)", ["LIN.2", "LIN.3", "LIN.4"]),
    ("# (LIK.2/4)", ["LIK.2", "LIK.4"]),
])
def test_citation_pattern(line, expected):
    found = []
    for fam, a, sep, b in CITATION.findall(line):
        if not a:
            continue
        if sep == "-":
            found += [f"{fam}.{i}" for i in range(int(a), int(b) + 1)]
        elif sep == "/":
            found += [f"{fam}.{a}", f"{fam}.{b}"]
        else:
            found.append(f"{fam}.{a}")
    assert found == expected
