"""Runs the code blocks of one documentation page in order, as a user pasting them would (tests/test_docs.py).

``python docs_runner.py BLOCKS.json`` in the page's working folder. Python blocks share one namespace, as in one
script or notebook, and run at this script's top level with no ``if __name__ == "__main__":`` guard: the API must
work from such a plain script. Bash blocks run with ``bash -euo pipefail``; a
block marked ``file: NAME`` (params.yaml ...) is written to that file. The first failing block stops the
page: its place (``docs/PAGE.md:LINE``) and the error are printed and the exit code is 1.
"""

import json
import subprocess
import sys
import traceback

blocks = json.loads(open(sys.argv[1], encoding="utf-8").read())
namespace = {"__name__": "__docs__"}
failed = None
for block in blocks:
    where = block["where"]
    print(f"---- {where} [{block['lang']}]", flush=True)
    if block["lang"] == "file":  # a file the page shows (params.yaml ...), written where the page says
        with open(block["file"], "w", encoding="utf-8") as f:
            f.write(block["code"] + "\n")
    elif block["lang"] == "python":
        try:
            exec(compile(block["code"], where, "exec"), namespace)
        except BaseException:  # noqa: BLE001 - report any failure of the block, SystemExit included
            traceback.print_exc()
            failed = where
    else:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block["code"]])
        if proc.returncode:
            print(f"exit code {proc.returncode}", file=sys.stderr)
            failed = where
    sys.stdout.flush()
    sys.stderr.flush()
    if failed:
        print(f"DOCS BLOCK FAILED: {failed}", flush=True)
        sys.exit(1)
print("DOCS PAGE PASSED", flush=True)
