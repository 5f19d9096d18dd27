"""How long a test waits for a child process: a bound on hangs (a deadlocked collective, a
child waiting on a dead peer), not on speed. A fixed minute count fails correct tests on a
busy machine, so the bound is generous and one place sets it;
``RESNEXT_FLAX_TEST_CHILD_TIMEOUT`` (seconds) overrides it."""

from __future__ import annotations

import os

CHILD_TIMEOUT = float(os.environ.get("RESNEXT_FLAX_TEST_CHILD_TIMEOUT", 3600))
