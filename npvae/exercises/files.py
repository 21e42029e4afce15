"""Where the exercise files live, how a blank is made from a solution, and copying them out.

The package holds three trees:

    solutions/fill/*.py   the fill-in exercises, solved; each student part sits between
                          a "# BEGIN SOLUTION" and an "# END SOLUTION" line
    templates/fill/*.py   the same files with every such part replaced by a
                          NotImplementedError: what a student gets (made by :func:`blank`)
    templates/bugs/*.py   the bug hunts, one planted bug each; solutions/bugs/ the fixed ones

``tests/test_exercises.py`` checks that every template is exactly the blank of its solution.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

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


def exercise_files(tree: Path) -> list:
    """The exercise files of a tree (fill/*.py, bugs/*.py), as paths relative to it."""
    return sorted(p.relative_to(tree) for sub in ("fill", "bugs") for p in (tree / sub).glob("*.py"))


def copy_out(tree: Path, dest: Path) -> list:
    """Copy a tree's exercise files and README.md into ``dest``, which must not exist or be
    empty. Returns the paths written. Raises FileExistsError instead of overwriting."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(
            f"{dest} already exists and is not an empty folder; nothing was written. "
            f"Choose a new folder, so no work is overwritten.")
    files = [Path("README.md"), *exercise_files(tree)]
    written = []
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tree / rel, target)
        written.append(target)
    return written
