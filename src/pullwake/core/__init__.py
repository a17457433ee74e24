"""The use cases: what the HTTP API, the CLI and the worker do, over the store and Redis.

- :mod:`~pullwake.core.entities`: create, read, send, page, signal, members; wakes (audit).
- :mod:`~pullwake.core.batch`: many sends in one call.
- :mod:`~pullwake.core.claims`: a runner claims a wake.
- :mod:`~pullwake.core.callbacks`: the holder's heartbeat, done (chaining), release, events.
- :mod:`~pullwake.core.webhook_claims`: the worker claims webhook wakes for their targets.
- :mod:`~pullwake.core.tokens`: API tokens: mint, authenticate (auth cache), list, revoke.
- :mod:`~pullwake.core.runners`: the runner registry: registration (per-principal cap),
  ownership and cached access, heartbeats, admin status, deletion, health.
- :mod:`~pullwake.core.entity_types`: entity types and their default dispatch policy.
- :mod:`~pullwake.core.recovery` and :mod:`~pullwake.core.retention`: the worker's repairs.
- :mod:`~pullwake.core.steps`: what the state-machine calls answer, turned into errors,
  metrics and views.

Each state change is one call of :class:`~pullwake.core.ports.StateMachine` (the store), and
each read one typed call of :class:`~pullwake.core.ports.EntityReads`,
:class:`~pullwake.core.ports.RecoveryReads`, :class:`~pullwake.core.ports.Pruning`,
:class:`~pullwake.core.ports.TokenStore`, :class:`~pullwake.core.ports.RunnerReads` or
:class:`~pullwake.core.ports.EntityTypeStore`, so a use case can be unit-tested with a fake of
them.
"""
