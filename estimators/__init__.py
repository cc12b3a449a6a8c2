"""Gradient estimators, one module each (estimators/base.py holds the contract). BUILT_IN maps
each name to its class, ALIASES the other names users know them by: adding an estimator is a
module here and a line below."""

BUILT_IN = {
    "full": "estimators.full:Full",
    "checkpoint": "estimators.checkpoint:Checkpoint",
    "adjoint": "estimators.adjoint:Adjoint",
    "sdo": "estimators.sdo:SDO",
    "truncated": "estimators.truncated:Truncated",
    "draft-lv": "estimators.draft_lv:DraftLV",
    "zeroth-order": "estimators.zeroth_order:ZerothOrder",
    "score-function": "estimators.score_function:ScoreFunction",
    "dno": "estimators.dno:DNO",
    "edict": "estimators.edict:EDICT",
    "torchdiffeq-adjoint": "estimators.torchdiffeq_adjoint:TorchdiffeqAdjoint",
    "coarse-adjoint": "estimators.coarse_adjoint:CoarseAdjoint",
    "shortcut-model": "estimators.shortcut_model:ShortcutModel",
}
ALIASES = {"bptt": "full", "draft": "truncated", "alignprop": "truncated", "adjointdpm": "adjoint",
           "ddpo": "score-function", "doodl": "edict", "spsa": "zeroth-order", "es": "zeroth-order",
           "shortft": "shortcut-model"}
