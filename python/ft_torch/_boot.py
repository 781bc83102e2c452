"""`python -m ft_torch._boot <the original command line>`: how a training
process restarts itself after a failure (ft_torch.coordinated.restart).

It rejoins the job first, in a few tens of milliseconds (this module and the
session import no torch), so the coordinator keeps hearing the worker; then
it runs the original script or module as `python` would, and the script's
`ft_torch.start()` finds the session already open.
"""

from __future__ import annotations

import json
import os
import runpy
import sys

# The original command after the interpreter, as a JSON list: [options..., script | -m module, args...].
ORIGINAL_ENV = "FT_TORCH_COMMAND"


def command(executable: str) -> list[str]:
    """The argv that restarts this process through this module (the
    interpreter's own options first, as they were)."""
    if ORIGINAL_ENV not in os.environ:
        os.environ[ORIGINAL_ENV] = json.dumps(sys.orig_argv[1:])
    args = json.loads(os.environ[ORIGINAL_ENV])
    options, _, _ = _split(args)
    return [executable, *options, "-m", "ft_torch._boot", *args]


def _split(args: list[str]):
    """Interpreter options, then the target ("-m", name) or ("path", path), then its arguments."""
    options = []
    i = 0
    while i < len(args) and args[i].startswith("-"):
        a = args[i]
        if a == "-m":
            return options, ("-m", args[i + 1]), args[i + 2:]
        if a == "-c":
            raise SystemExit("ft_torch: a training process started with python -c cannot restart itself; use a script")
        options.append(a)
        if a in ("-X", "-W") and i + 1 < len(args):
            options.append(args[i + 1])
            i += 1
        i += 1
    return options, ("path", args[i]), args[i + 1:]


def main() -> None:
    import ft_torch
    from ft_torch.coordinated import log
    log("restarted process up")
    ft_torch.start()  # hello, heartbeats, this epoch's restore instruction
    _, (kind, target), rest = _split(json.loads(os.environ[ORIGINAL_ENV]))
    if kind == "-m":
        sys.argv = [target] + rest
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [target] + rest
        sys.path[0] = os.path.dirname(os.path.abspath(target))
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()
