"""gardenctl's memory-cap hook, run by Python's `site` module at every interpreter start-up of a
worker with `memory_cap: true` (this directory is first on its PYTHONPATH; `site` imports the
first `sitecustomize` on sys.path, Python docs "site — Site-specific configuration hook").

1. Arms the cap (gardenctl_memcap.install): a no-op without GARDENCTL_MEMORY_CAP_BYTES.
2. Runs the `sitecustomize` that would have run without us (a user's, a virtualenv's, the
   distribution's), found on sys.path after this directory, under the same module name.
Never raises: a failure is one line on stderr and the interpreter carries on. Python's `-S`, `-I`
and `-E` flags skip this file (and PYTHONPATH) altogether; vLLM starts its children with the
parent's interpreter flags (multiprocessing's spawn passes them on).
"""

import importlib
import os
import sys

_HERE = os.path.dirname(os.path.realpath(__file__))


def _arm() -> None:
    try:
        # this directory is on sys.path (that is how we got here); by name, so that a type
        # checker reading gardenctl's package does not look for a top-level module
        gardenctl_memcap = importlib.import_module("gardenctl_memcap")
        gardenctl_memcap.extend_path(here=_HERE)
        gardenctl_memcap.install()
    except Exception as exc:  # noqa: BLE001 (never break the worker)
        sys.stderr.write(f"gardenctl memory cap: hook failed in pid {os.getpid()}: {exc!r} "
                         "(no cap)\n")


def _chain() -> None:
    """Execute the next `sitecustomize` on sys.path after this directory, if there is one."""
    try:
        from importlib.machinery import PathFinder
        from importlib.util import module_from_spec

        later, seen = [], False
        for entry in sys.path:
            try:
                same = os.path.realpath(entry or ".") == _HERE
            except (OSError, ValueError):
                same = False
            if same:
                seen = True
            elif seen:
                later.append(entry)
        spec = PathFinder.find_spec("sitecustomize", later)
        if spec is None or spec.loader is None:
            return
        module = module_from_spec(spec)
        sys.modules["sitecustomize"] = module
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 (never break the worker)
        sys.stderr.write(f"gardenctl memory cap: the next sitecustomize failed in pid "
                         f"{os.getpid()}: {exc!r}\n")


_arm()
_chain()
