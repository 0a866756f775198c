"""After a load the store hands malloc's free memory back to the OS (policy_engine.memory).

Runs the store in a fresh interpreter on a real directory. Right after `reload()` returns, a
further `malloc_trim(0)` must find (almost) nothing left to give back: the store has done it.
Without the release, the load's freed objects keep ~1.5 MB of RSS at 2,000 user policies
(~10 MB at 10,000).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from policy_engine.memory import can_release
from tests.policy_builder import write_user_policies

POLICIES = 2_000
# What a trim may still find after the store's own: the few allocations in between.
LEFT_OVER_BYTES = 256 * 1024

_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from policy_engine.memory import release_free_memory
    from policy_engine.store import DirectoryBackend, PolicyStore, ReloadResult

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * page

    def given_back() -> int:
        before = rss()
        release_free_memory()
        return before - rss()

    store = PolicyStore(DirectoryBackend(Path(sys.argv[1])))
    assert store.reload("startup") is ReloadResult.LOADED, store.status().last_error
    after_swap = given_back()
    assert store.reload("again", full=True) is ReloadResult.UNCHANGED
    after_unchanged = given_back()
    print(json.dumps({"after_swap": after_swap, "after_unchanged": after_unchanged}))
    """
)


@pytest.mark.skipif(not can_release(), reason="no malloc_trim (not glibc)")
def test_a_reload_gives_freed_memory_back(tmp_path: Path) -> None:
    root = tmp_path / "policies"
    write_user_policies(root, "acme", POLICIES, templated=False)
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(root)],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["after_swap"] <= LEFT_OVER_BYTES, figures
    assert figures["after_unchanged"] <= LEFT_OVER_BYTES, figures
