"""diffgrad-bench: a benchmark of gradient estimators through diffusion samplers.

The package by direction of data flow (tests/test_layers.py checks it: nothing imports upward,
no cycles):

    bench/*.py, bench/samplers/   the model plug-ins build on: chain, problem, options, registry,
                                  errors, capabilities, rewards, samplers (no processes, no files)
    bench/measure/                in-process measurement: timing, memory peaks
    bench/api.py                  the one module a plug-in imports
    bench/results/                reading rows: fields, store, analysis, summary, report, plots,
                                  figures, compare, status
    bench/planner/                every estimator's memory and cost on a real architecture, from its
                                  configs, counted under fake tensors (python -m bench plan)
    bench/run/                    running sweeps: settings, plan, cells, isolation, launchers,
                                  the execute loop, identity (cell keys), provenance
    bench/check/                  the conformance suites (estimators, samplers, tasks)
    bench/cli/                    the command line

The harness's modules lived at the top of the package before (bench.runner, bench.store...);
those names still import, as the same module objects, through the table below."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

__version__ = "0.1.0"

# former module name -> where it lives now
MOVED = {
    **{
        f"bench.{name}": f"bench.results.{name}"
        for name in (
            "store",
            "fields",
            "analysis",
            "summary",
            "report",
            "plots",
            "figures",
            "compare",
            "status",
            "jobs",
        )
    },
    **{
        f"bench.{name}": f"bench.run.{name}"
        for name in (
            "identity",
            "guard",
            "limits",
            "memory",
            "memworker",
            "provenance",
            "settings",
            "plan",
            "cell",
            "isolate",
            "points",
            "launch",
            "execute",
            "runner",
            "sweepfile",
        )
    },
    "bench.timing": "bench.measure.timing",
    "bench.conformance": "bench.check.estimators",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import bench.runner` gives the module bench.run.runner itself (one object: a patched name
    is seen by its users), and `python -m bench.settings` runs bench/run/settings.py."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        real = importlib.util.find_spec(MOVED[fullname])
        return importlib.machinery.ModuleSpec(fullname, self, origin=real.origin if real else None)

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass  # imported by create_module

    def get_code(self, fullname):  # runpy (python -m) runs the real module's code as __main__
        real = importlib.util.find_spec(MOVED[fullname])
        return real.loader.get_code(real.name)


if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
    sys.meta_path.append(_Alias())
