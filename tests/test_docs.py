"""Every `python main.py` command shown in README.md and docs/*.md parses and passes the config's
checks (flags, values, inputs that exclude each other). The README's offline and real-data
commands are also run end to end (test_main.py, test_real_data.py)."""

import glob
import os
import re
import shlex

import pytest

import config
from helpers import ROOT

PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def commands(path):
    """(line number, argv after main.py) of each `python main.py` / `torchrun … main.py` line in the
    page's ```bash blocks, continuations joined and comments dropped."""
    text = open(path).read()
    out = []
    for block in re.finditer(r"```bash\n(.*?)```", text, re.S):
        start = text[:block.start()].count("\n") + 2
        joined = re.sub(r"\\\n\s*", " ", block.group(1))
        for n, line in enumerate(joined.splitlines()):
            words = shlex.split(line, comments=True)
            if "main.py" in words and words[0] in ("python", "python3", "torchrun") or \
                    (words and "=" in words[0] and "main.py" in words):
                out.append((start + n, words[words.index("main.py") + 1:]))
    return out


CASES = [(os.path.relpath(p, ROOT), n, argv) for p in PAGES for n, argv in commands(p)]


def test_the_docs_show_commands():
    assert len(PAGES) > 5 and len(CASES) > 20, (PAGES, len(CASES))


@pytest.mark.parametrize("page,line,argv", CASES, ids=[f"{p}:{n}" for p, n, _ in CASES])
def test_documented_command_is_valid(page, line, argv):
    schema = config.defaults()
    try:
        args = config.build_parser(schema).parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{page}:{line}: python main.py {' '.join(argv)} -> argparse exit {e.code}")
    given = [n for n in config.FLAGS if getattr(args, n) is not None]
    cfg, explicit = config.resolve_config(args, given, schema)
    config.check_conflicts(cfg, explicit)
