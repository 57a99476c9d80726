"""``python -m headless run WORKFLOW.json ...`` (headless runner) and ``python -m headless serve ...`` (a local
ComfyUI server with this pack). ``python -m headless run --help`` / ``serve --help`` list the options."""
from __future__ import annotations

import sys

USAGE = """usage: python -m headless {run,serve} ...

  run WORKFLOW.json [--set NODE_ID.INPUT=VALUE ...] [--out DIR] [--comfyui PATH] [--models DIR] [--cpu]
        run a UI- or API-format workflow in a headless ComfyUI and write its images into --out
  serve [--port 8188] [--comfyui PATH] [--workdir out/comfyui] [--models DIR] [--tiny-models]
        start the real ComfyUI server (web UI) with this pack, on 127.0.0.1 only
"""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        from .runner import main as run_main
        return run_main(rest)
    if command == "serve":
        from .serve import main as serve_main
        return serve_main(rest)
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
