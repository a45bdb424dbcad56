"""Generate docs/settings.md and .env.example from ``retest.config.SETTINGS``.

    python3 tools/settings_docs.py --markdown      # print the table
    python3 tools/settings_docs.py --env-example   # print .env.example
    python3 tools/settings_docs.py --write         # rewrite both files in the checkout

tests/test_settings.py fails when a committed file differs from what this prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from retest import config  # noqa: E402

TARGETS = {ROOT / "docs" / "settings.md": config.markdown_table,
           ROOT / ".env.example": config.env_example}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--markdown", action="store_true")
    group.add_argument("--env-example", action="store_true")
    group.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(config.markdown_table())
    elif args.env_example:
        sys.stdout.write(config.env_example())
    else:
        for path, render in TARGETS.items():
            path.write_text(render())
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
