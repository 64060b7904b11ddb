"""Module count, median / largest module and longest function of alpa_py.

Usage: python tools/module_stats.py [REPO_ROOT]
"""

import ast
import pathlib
import statistics
import sys


def main(root: str = ".") -> None:
  pkg = pathlib.Path(root) / "alpa_py"
  sizes, longest = {}, (0, "")
  for path in sorted(pkg.rglob("*.py")):
    text = path.read_text()
    name = str(path.relative_to(pkg.parent))
    sizes[name] = len(text.splitlines())
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > longest[0]:
          longest = (n, f"{name}:{node.name}")
  big = max(sizes, key=sizes.get)
  print(f"modules {len(sizes)}, median {statistics.median(sizes.values())} "
        f"lines, largest {sizes[big]} ({big}), total {sum(sizes.values())}; "
        f"longest function {longest[0]} lines ({longest[1]})")


if __name__ == "__main__":
  main(*sys.argv[1:])
