"""``npvae exercises``: write the exercises into a folder, grade them, hand out solutions.

    npvae exercises new DIR           the blanks and the bug hunts, with a README
    npvae exercises check DIR [NAME]  PASS or FAIL for each, a hint for each failure;
                                      exit status 0 only when every one checked passes
    npvae exercises solutions DIR     the solved files, for teachers
    npvae exercises list              the exercises and the tags they practise
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..cli_common import add_command


def add_exercises_command(sub) -> None:
    """Register ``npvae exercises`` on the subparsers of the main command."""
    p = add_command(
        sub, "exercises", "fill-in-the-backward exercises and bug hunts, with an autograder",
        "Exercises: write the backward pass of each op, and find the one planted bug in each "
        "of six small models. `new` writes them into a folder, `check` grades them with "
        "gradient checks in float64 (and value checks where a gradient check cannot see the "
        "mistake), `solutions` writes the solved files.",
        epilog="example:\n  npvae exercises new hw\n  (edit hw/fill/01_linear.py)\n"
               "  npvae exercises check hw 01")
    ex = p.add_subparsers(dest="exercises_command", metavar="ACTION", required=True)
    new = ex.add_parser("new", help="write the exercises into a new folder")
    new.add_argument("dir", metavar="DIR", type=Path, help="a folder that does not exist yet, or is empty")
    new.set_defaults(func=cmd_new)
    check = ex.add_parser("check", help="grade the exercises in a folder")
    check.add_argument("dir", metavar="DIR", type=Path, help="the folder `new` wrote")
    check.add_argument("names", metavar="NAME", nargs="*",
                       help="only these exercises, by name or number (01, b3); default all")
    check.set_defaults(func=cmd_check)
    sol = ex.add_parser("solutions", help="write the solved files into a new folder (for teachers)")
    sol.add_argument("dir", metavar="DIR", type=Path, help="a folder that does not exist yet, or is empty")
    sol.set_defaults(func=cmd_solutions)
    lst = ex.add_parser("list", help="list the exercises")
    lst.set_defaults(func=cmd_list)


def _write(solved, dest, what) -> int:
    from .files import write_out

    try:
        written = write_out(solved, dest)
    except FileExistsError as exc:
        print(f"npvae: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written) - 1} {what} and a README into {dest}")
    return 0


def cmd_new(ns) -> int:
    code = _write(False, ns.dir, "exercise files")
    if code == 0:
        print(f"start with {ns.dir / 'README.md'}; grade with: npvae exercises check {ns.dir}")
    return code


def cmd_solutions(ns) -> int:
    return _write(True, ns.dir, "solved files")


def cmd_list(ns) -> int:
    from .grader import EXERCISES

    for e in EXERCISES:
        print(f"{e.name:<24} {e.path.parent}/  {e.title}")
    return 0


def cmd_check(ns) -> int:
    from .grader import check_folder

    if not ns.dir.is_dir():
        print(f"npvae: error: {ns.dir} is not a folder; make one with: npvae exercises new {ns.dir}",
              file=sys.stderr)
        return 2
    try:
        results = check_folder(ns.dir, ns.names)
    except KeyError as exc:
        print(f"npvae: error: {exc.args[0]}", file=sys.stderr)
        return 2
    for r in results:
        print(f"{'PASS' if r.passed else 'FAIL'}  {r.name}")
        if not r.passed:
            print(f"      {r.message}")
            if r.hint:
                print(f"      hint: {r.hint}")
    passed = sum(r.passed for r in results)
    print(f"{passed} of {len(results)} passed")
    return 0 if passed == len(results) else 1
