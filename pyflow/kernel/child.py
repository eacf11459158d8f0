"""The compile child: ``python -m pyflow.kernel.child compile`` (pin.compile_pinned starts it).

bcc and LLVM live and die here: the child compiles, loads every program, pins everything in a
new generation directory and writes the manifest, then prints one result line
(``pin.RESULT_MARK`` + JSON) and exits; the agent opens what it pinned.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from pyflow.errors import PyflowError
from pyflow.kernel import build
from pyflow.kernel.abi import PROGRAMS
from pyflow.kernel.bpfsys import BpfError, prog_bind_map
from pyflow.kernel.pin import (
    FORMAT,
    HOOKS,
    MANIFEST,
    RESULT_MARK,
    Instance,
    _settings_doc,
    create_own_maps,
    map_info,
    pin_instance,
    source_hash,
    write_manifest,
)
from pyflow.kernel.settings import KernelSettings


def _child_compile(args: list[str]) -> dict[str, Any]:
    """In the child: compile, load every program, pin everything in a new directory, write the manifest."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m pyflow.kernel.child compile")
    p.add_argument("--dir", required=True)
    p.add_argument("--netns", type=int, required=True)
    p.add_argument("--bpf-dir", required=True)
    p.add_argument("--settings", required=True)
    a = p.parse_args(args)
    settings = KernelSettings(**json.loads(a.settings))
    path = Path(a.dir)
    program = build.compile_program(settings, Path(a.bpf_dir))  # no loader here: no netlink, no pyroute2
    own = create_own_maps(settings.cache_entries)
    try:
        progs = {h: program.load(PROGRAMS[h], xdp=h == "xdp") for h in HOOKS}
        inst = Instance(manifest={}, maps={**program.maps, **own}, progs=progs)
        for pfd in inst.progs.values():  # any one program, attached, holds the whole instance
            for extra in inst.maps.values():
                try:
                    prog_bind_map(pfd, extra)
                except BpfError as exc:  # before Linux 5.10: found through its pins only
                    if exc.errno != errno.EINVAL:
                        raise
                    break
        manifest = {
            "format": FORMAT,
            "name": path.name,
            "netns": a.netns,
            "created_ns": time.time_ns(),
            "settings": _settings_doc(settings),
            "source": source_hash(Path(a.bpf_dir)),
            "programs": inst.prog_ids(),
            "maps": {n: map_info(fd).id for n, fd in sorted(inst.maps.items())},
            "attachments": [],
        }
        write_manifest(inst.maps[MANIFEST], manifest)
        pin_instance(inst, path)
        return {"ok": True, "dir": str(path), "programs": manifest["programs"]}
    finally:
        for fd in own.values():
            os.close(fd)
        program.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "compile":
        print("usage: python -m pyflow.kernel.child compile --dir DIR --netns INODE --bpf-dir DIR --settings JSON",
              file=sys.stderr)
        return 2
    try:
        result = _child_compile(args[1:])
    except PyflowError as exc:
        print(RESULT_MARK + json.dumps({"ok": False, "error": str(exc)}), flush=True)
        return exc.exit_code
    except Exception as exc:
        print(RESULT_MARK + json.dumps({"ok": False, "error": f"compiling the meter failed: {exc!r}"}), flush=True)
        return 3
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
