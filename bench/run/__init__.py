"""Running sweeps: the run settings (settings, sweepfile), the plan of cells and their keys (plan,
identity), the phases of a cell (cell), where cells run (points, isolate, launch), the one execute
loop (execute, runner), memory measurement in a clean worker (memory, memworker), limits, guards
and the provenance of a run folder."""
