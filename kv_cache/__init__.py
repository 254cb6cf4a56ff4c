"""Causal-mode KV caches: a per-layer frame store and the policies that select from it.

* :class:`KVStore` -- committed K/V by frame in a ring of slots, logical frames
  kept apart from physical slots, sink frames pinned;
* policies -- :class:`Full`, :class:`WindowSink`, :class:`TopK` (attention
  top-k) and :class:`FocusedForcing` (per-frame, per-head, relevance plus
  diversity, head-dependent budgets, calibrated or from attention) and
  :class:`HeadMask` (the calibration's probe: one head's history hidden);
* :func:`attend` -- attention over the selected committed frames plus the
  frames always attended.

The policy names (``PolicyName``) and the budget rule (``resolve_budget``) are
declared in :mod:`dualpar.config`, which validates them without importing torch.
"""

from .attention import Selection, attend, history_mass, sample_queries
from .policy import FocusedForcing, Full, HeadMask, Policy, TopK, WindowSink, auto_sample, make_policy
from .store import KVStore

__all__ = ["KVStore", "Selection", "attend", "history_mass", "sample_queries", "Policy", "Full", "WindowSink",
           "TopK", "FocusedForcing", "HeadMask", "make_policy", "auto_sample"]
