"""Environment for the CPU (gloo) rank processes of the multi-rank tests.

The one implementation is the overlay tests' ``forkserver_env``
(``megatron_overlay/tests/unit_tests/gloo_ranks.py``, which imports nothing), loaded
here by path for the project's own multi-rank tests.
"""

from __future__ import annotations

from project_paths import load_script

forkserver_env = load_script(
    "megatron_overlay/tests/unit_tests/gloo_ranks.py", "gloo_ranks"
).forkserver_env
