"""Dev tooling, outside the library's import path: ``pullwake dev`` (:mod:`pullwake.dev.devmode`),
the embedded Postgres and Redis it and the test suite start (:mod:`pullwake.dev.embedded`,
``python -m pullwake.dev.embedded run -- CMD``) and the demo runner with its handler
(:mod:`pullwake.dev.demo`, ``--handler pullwake.dev.demo:handle``).

Only the CLI's ``dev`` command, the scripts and the tests import this package; nothing in the
library (runner, client, HTTP API, core, store, streams) does."""
