"""Result types shared by the public API and the reference."""
from typing import Any, NamedTuple, Optional


class Routing(NamedTuple):
    """Result of :func:`numoe.route`.

    weights : [T, k] float (input dtype) -- combine weights.
    experts : [T, k] int32 -- chosen experts, descending selection score.
    """

    weights: Any
    experts: Any


class DispatchPlan(NamedTuple):
    """Result of :func:`numoe.dispatch_plan`.

    order : [N] int32/int64 -- flat assignment ids ``t*k + j`` grouped by expert
        (ascending expert id, ascending flat id inside an expert).
    offsets : [E+1] int64 -- expert ``e`` owns ``order[offsets[e]:offsets[e+1]]``.
    counts : [E] int64 -- kept assignments per expert.
    dropped : [T, k] bool -- assignments dropped by the capacity limit.
    capacity : int or None -- the capacity used (None: dropless).
    """

    order: Any
    offsets: Any
    counts: Any
    dropped: Any
    capacity: Optional[int]
