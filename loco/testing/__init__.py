"""Fault injection for drills and tests only; production code never imports it.

It ships inside ``loco`` because the drills (tests/drills/) run real ``loco.worker`` processes
that must load the faults of ``$LOCO_FAULTS``; :func:`loco.build.outer_from` imports it for that
one variable. Nothing here is used when the variable is unset.

- :mod:`loco.testing.faults`: the ``LOCO_FAULTS`` spec of a federation (partition, slow site,
  bad payloads) and ``FaultyOuterLoop``, the outer loop that applies it.
- :mod:`loco.testing.gossip_faults`: ``ServerFault`` / ``FaultyServer`` (a gossip server that
  delays, dies mid-stream, corrupts a chunk, breaks a stream once or lies in its headers) and
  :func:`~loco.testing.gossip_faults.cut_links` (a client whose links to some sites are cut).
"""
