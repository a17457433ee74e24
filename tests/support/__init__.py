"""Test support shared by the unit, integration and end-to-end tests (``from support.sse
import ...``: pytest puts ``tests/`` on the import path, as for ``cluster``)."""
