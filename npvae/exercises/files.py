"""How the files a student or a teacher receives are made, and writing them into a folder.

Each piece of exercise text is kept once, beside this module:

    solutions/fill/*.py   the fill-in exercises, solved; each student part sits between
                          a "# BEGIN SOLUTION" and an "# END SOLUTION" line, which
                          :func:`blank` turns into a NotImplementedError for the student
    solutions/bugs/*.py   the correct programs behind the bug hunts; the story around each
                          and the lines that plant its bug are in :mod:`npvae.exercises.hunts`
    templates/README.md   the student's README; solutions/README.md the teacher's

``npvae exercises new`` writes :func:`exercise_texts` unsolved, ``solutions`` solved.
"""
from __future__ import annotations

import re
from pathlib import Path

from .hunts import HUNTS, BugHunt

PACKAGE = Path(__file__).resolve().parent
TEMPLATES = PACKAGE / "templates"
SOLUTIONS = PACKAGE / "solutions"
BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
_DEF = re.compile(r"^\s*def (\w+)\(")


def blank(text: str) -> str:
    """The student's version of a solved file: each solution block becomes a stub that
    raises NotImplementedError naming its function."""
    out, function, inside = [], "this function", False
    for line in text.splitlines(keepends=True):
        m = _DEF.match(line)
        if m and not inside:
            function = m.group(1)
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise ValueError(f"nested {BEGIN} in {function}")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}# Your code here: see the docstring at the top of the file.\n")
            out.append(f'{indent}raise NotImplementedError("{function} is not written yet")\n')
        elif stripped == END:
            if not inside:
                raise ValueError(f"{END} without {BEGIN} in {function}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{BEGIN} without {END} in {function}")
    return "".join(out)


def replace_lines(text: str, pairs, where: str) -> str:
    """Swap each (old, new) pair of line groups in ``text``, in order (see
    :mod:`npvae.exercises.hunts`). Lines match without their indentation; the new lines take
    the indentation of the first old one. Raises ValueError unless ``old`` matches exactly once."""
    lines = text.split("\n")
    for old, new in pairs:
        old = old.split("\n")
        hits = [i for i in range(len(lines) - len(old) + 1)
                if [line.strip() for line in lines[i:i + len(old)]] == old]
        if len(hits) != 1:
            raise ValueError(f"{where}: {len(hits)} places match {old[0]!r}, not exactly one")
        i = hits[0]
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        lines[i:i + len(old)] = [indent + line for line in new.split("\n")]
    return "\n".join(lines)


def hunt_text(hunt: BugHunt, solved: bool) -> str:
    """A bug hunt's file: fixed (``solved``) or with its bug planted."""
    program = (SOLUTIONS / "bugs" / hunt.program).read_text(encoding="utf-8")
    _, described, code = program.split('"""', 2)  # the program's docstring, then its code
    text = (f'"""{hunt.opening}\n\n{described.strip()}\n\n{hunt.closing}\n'
            f'Check it: npvae exercises check DIR {hunt.name}\n"""{code}')
    text = replace_lines(text, hunt.variant, hunt.name)
    return text if solved else replace_lines(text, hunt.bug, hunt.name)


def exercise_texts(solved: bool) -> dict:
    """Every file ``npvae exercises new`` (unsolved) or ``solutions`` writes: path -> text."""
    texts = {Path("README.md"): ((SOLUTIONS if solved else TEMPLATES) / "README.md").read_text(
        encoding="utf-8")}
    for path in sorted((SOLUTIONS / "fill").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        texts[Path("fill") / path.name] = text if solved else blank(text)
    for hunt in HUNTS:
        texts[Path("bugs") / f"{hunt.name}.py"] = hunt_text(hunt, solved)
    return texts


def write_out(solved: bool, dest: Path) -> list:
    """Write the exercise files, solved or not, into ``dest``, which must not exist or be
    empty. Returns the paths written. Raises FileExistsError instead of overwriting."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(
            f"{dest} already exists and is not an empty folder; nothing was written. "
            f"Choose a new folder, so no work is overwritten.")
    written = []
    for rel, text in exercise_texts(solved).items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8", newline="\n")
        written.append(target)
    return written
