"""The planner: every estimator's peak memory, FLOPs and time per gradient on a real architecture,
from its configs alone (models), counted under fake tensors (units), composed by each estimator's
own cost model (table). `python -m bench plan` prints it."""
