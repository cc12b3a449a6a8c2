"""Gradient estimators, one module each (estimators/base.py holds the contract). BUILT_IN maps
each name to its class, in the order tables and figures list them; ALIASES the other names users
know them by. Adding an estimator is a module here and a line below."""

BUILT_IN = {
    "full": "estimators.full:Full",
    "checkpoint": "estimators.checkpoint:Checkpoint",
    "adjoint": "estimators.adjoint:Adjoint",
    "sdo": "estimators.sdo:SDO",
    "truncated": "estimators.truncated:Truncated",
    "draft-lv": "estimators.draft_lv:DraftLV",
    "score-function": "estimators.score_function:ScoreFunction",
    "zeroth-order": "estimators.zeroth_order:ZerothOrder",
    "dno": "estimators.dno:DNO",
    "edict": "estimators.edict:EDICT",
    "torchdiffeq-adjoint": "estimators.torchdiffeq_adjoint:TorchdiffeqAdjoint",
    "shortcut-model": "estimators.shortcut_model:ShortcutModel",
    "coarse-adjoint": "estimators.coarse_adjoint:CoarseAdjoint",
    "refl": "estimators.refl:ReFL",
    "drtune": "estimators.drtune:DRTune",
    "direct-align": "estimators.direct_align:DirectAlign",
    "leapalign": "estimators.leapalign:LeapAlign",
    "flowbp": "estimators.flowbp:FlowBP",
    "adjoint-matching": "estimators.adjoint_matching:AdjointMatching",
    "diffusion-nft": "estimators.diffusion_nft:DiffusionNFT",
}
ALIASES = {
    "bptt": "full",
    "draft": "truncated",
    "alignprop": "truncated",
    "adjointdpm": "adjoint",
    "ddpo": "score-function",
    "doodl": "edict",
    "spsa": "zeroth-order",
    "es": "zeroth-order",
    "shortft": "shortcut-model",
    "srpo": "direct-align",
}
