"""The bundle's entry point: `qdesk ARGS` runs the command line, `qdesk -m MODULE ARGS` runs one of qdesk's modules.

qdesk starts every helper process (the engine worker, the quantizer, each step run in a child) through
`native.child.spawn_python`, as `[sys.executable, "-m", "native.child", ...]`. In the bundle `sys.executable` is
this program, so it answers `-m` the way the Python interpreter would, for qdesk's own packages only.
"""

from __future__ import annotations

import runpy
import sys

RUNNABLE_PACKAGES = ("qdesk", "converters", "native")


def _is_runnable(module: str) -> bool:
    return any(module == package or module.startswith(package + ".") for package in RUNNABLE_PACKAGES)


def main() -> int:
    if len(sys.argv) >= 3 and sys.argv[1] == "-m":
        module = sys.argv[2]
        if not _is_runnable(module):
            print(f"qdesk: -m runs qdesk's own modules only, not {module}.", file=sys.stderr)
            return 2
        sys.argv = [module, *sys.argv[3:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    from qdesk.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
