"""Causal-mode KV caches: a per-layer frame store and the policies that select from it.

* :class:`KVStore` -- committed K/V by frame in a ring of slots, logical frames
  kept apart from physical slots, sink frames pinned;
* policies -- :class:`Full`, :class:`WindowSink`, :class:`TopK` (attention
  top-k) and :class:`FocusedForcing` (per-frame, per-head, relevance plus
  diversity, head-dependent budgets);
* :func:`attend` -- attention over the selected committed frames plus the
  frames always attended.
"""

from .attention import Selection, attend, history_mass, sample_queries
from .policy import POLICIES, auto_sample, FocusedForcing, Full, Policy, TopK, WindowSink, make_policy, resolve_budget
from .store import KVStore

__all__ = ["KVStore", "Selection", "attend", "history_mass", "sample_queries", "Policy", "Full", "WindowSink",
           "TopK", "FocusedForcing", "POLICIES", "make_policy", "resolve_budget", "auto_sample"]
