"""Count the import statements that sit inside functions (not at module level) in Python files.

    python scripts/count_function_imports.py roma_peft/*.py            # the working tree
    python scripts/count_function_imports.py --rev HEAD roma_peft/*.py  # the same files at a git revision

Prints, per file with any, the count and how many are roma_peft-internal (relative) imports, then the totals.
"""

import argparse
import ast
import subprocess


def function_imports(source: str) -> list:
    found = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    found[id(sub)] = sub
    return list(found.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--rev", help="read the files at this git revision instead of the working tree")
    args = parser.parse_args()
    total = internal = 0
    for path in args.files:
        if args.rev:
            shown = subprocess.run(["git", "show", f"{args.rev}:{path}"], capture_output=True, text=True)
            if shown.returncode:
                continue  # not in that revision
            source = shown.stdout
        else:
            with open(path, encoding="utf-8") as f:
                source = f.read()
        imports = function_imports(source)
        relative = sum(1 for i in imports if isinstance(i, ast.ImportFrom) and i.level > 0)
        if imports:
            print(f"{len(imports):4d} {relative:4d}  {path}")
        total, internal = total + len(imports), internal + relative
    print(f"total {total} (roma_peft-internal: {internal})")


if __name__ == "__main__":
    main()
