"""Summarise a py-spy ``raw`` (collapsed stacks) profile: the functions with the most samples, self and total.

    .venv/bin/python bench/profile_top.py OUT.txt [-n 25] [--filter kplane]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"^(.*) (\d+)$")


def frame_name(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``, line numbers dropped so one function is one row."""
    m = re.match(r"^(.*?) \((.*?)(?::\d+)?\)$", frame.strip())
    if not m:
        return frame.strip()
    func, path = m.groups()
    parts = path.split("/")
    short = "/".join(parts[-2:]) if "kplane" in path or "site-packages" in path else parts[-1]
    return f"{func} ({short})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile")
    ap.add_argument("-n", type=int, default=25)
    ap.add_argument("--filter", default="", help="only functions whose name or file contains this")
    args = ap.parse_args()
    self_c: Counter[str] = Counter()
    total_c: Counter[str] = Counter()
    n = 0
    for line in Path(args.profile).read_text().splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        stack, count = m.group(1), int(m.group(2))
        frames = [frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        # drop the thread/process label py-spy puts first
        if frames[0].startswith(("process ", "thread ")):
            frames = frames[1:]
        n += count
        if not frames:
            continue
        self_c[frames[-1]] += count
        for f in set(frames):
            total_c[f] += count
    print(f"{n} samples")
    for title, c in (("self", self_c), ("total (inclusive)", total_c)):
        print(f"\n{title}:")
        shown = 0
        for name, k in c.most_common():
            if args.filter and args.filter not in name:
                continue
            print(f"  {100 * k / max(n, 1):5.1f}%  {name}")
            shown += 1
            if shown >= args.n:
                break


if __name__ == "__main__":
    main()
