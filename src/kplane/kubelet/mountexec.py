"""Run inside a new private mount namespace (``unshare --mount --propagation private``): bind-mount the pod's
volumes at their mountPaths, then exec the container's command.

Usage: ``python -m kplane.kubelet.mountexec MOUNTS_JSON -- ARGV...`` where MOUNTS_JSON is a list of
``{"source": str, "target": str, "readOnly": bool}``. The mounts exist only in this namespace: other processes on
the host never see them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: mountexec MOUNTS_JSON -- ARGV...", file=sys.stderr)
        return 2
    mounts = json.loads(argv[0])
    for m in mounts:
        src, dst = m["source"], m["target"]
        if os.path.isdir(src):
            os.makedirs(dst, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if not os.path.exists(dst):
                open(dst, "a").close()
        subprocess.run(["mount", "--bind", src, dst], check=True)
        if m.get("readOnly"):
            subprocess.run(["mount", "-o", "remount,bind,ro", dst], check=True)
    cmd = argv[2:]
    try:
        os.execvp(cmd[0], cmd)
    except FileNotFoundError:
        print(f'exec: "{cmd[0]}": executable file not found in $PATH', file=sys.stderr)
        return 127
    except PermissionError:
        print(f'exec: "{cmd[0]}": permission denied', file=sys.stderr)
        return 126


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
