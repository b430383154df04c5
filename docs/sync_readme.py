"""Copy tables that runs wrote into README.md, so that the README cannot drift from them.

    python docs/sync_readme.py            # rewrite every included block of README.md
    python docs/sync_readme.py --check    # exit 1, naming the stale blocks, if any differs

A block is the text between ``<!-- include PATH -->`` and ``<!-- end include -->`` in the
README; it becomes the file PATH (relative to the README's folder) as it is, e.g. the
``table.md`` of a ``run.sh`` run, copied to ``docs/demo/table.md`` by ``bash run.sh
--update_docs``. The test suite runs the check.
"""

import argparse
import os
import re
import sys
from pathlib import Path

BLOCK = re.compile(r"(<!-- include (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- end include -->)", re.S)
README = Path(__file__).resolve().parents[1] / "README.md"


def synced(text: str, root: Path) -> tuple[str, list[str]]:
    """(the README text with every block replaced by its file, the paths of blocks that changed)."""
    stale = []

    def replace(match):
        path = match.group("path")
        source = root / path
        if not source.is_file():
            raise SystemExit(f"error: README block includes {path}, which does not exist")
        body = source.read_text(encoding="utf-8")
        body += "" if body.endswith("\n") else "\n"
        if body != match.group("body"):
            stale.append(path)
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(replace, text), stale


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--readme", default=str(README), help="the README to update (default: the repository's)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale")
    args = parser.parse_args(argv)
    readme = Path(args.readme)
    text, stale = synced(readme.read_text(encoding="utf-8"), readme.parent)
    if args.check:
        for path in stale:
            print(f"error: {readme}: the block of {path} differs from the file; run python docs/sync_readme.py",
                  file=sys.stderr)
        return 1 if stale else 0
    if stale:
        tmp = readme.with_name(f".{readme.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, readme)
    print(f"{readme}: {len(stale)} block(s) updated ({', '.join(stale) or 'all current'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
