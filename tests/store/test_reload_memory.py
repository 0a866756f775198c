"""Memory across reloads: replaced policy sets are freed (by reference counting alone, no
cycle keeps one alive), the compile cache stays bounded, and RSS does not grow.

Runs the store in a subprocess so its RSS is the store's alone. Every reload is a real edit of
one file (a new condition text), so each builds and swaps in a new set.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.policy_builder import write_user_policies

# The size: 50 real edits of a 10,000-policy set (~30 s on this 2-core box, most of it
# the edits: only the edited file is read, but each walks the tree and rebuilds one index).
MEMORY_POLICIES = 10_000
RELOADS = 50

_SCRIPT = textwrap.dedent(
    """
    import gc, json, os, sys
    from pathlib import Path
    from policy_engine.policy import CompiledPolicySet
    from policy_engine.store import DirectoryBackend, PolicyStore, ReloadResult
    from tests.policy_builder import dump_yaml, user_policy

    root, reloads = Path(sys.argv[1]), int(sys.argv[2])
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        gc.collect()
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * page

    def edit(step: int) -> None:
        policy = user_policy(7, templated=True)
        policy["rules"][0]["condition"] = f'scope == "edit-{step}"'
        target = root / "acme" / "users" / "user-00007.yaml"
        target.write_text(dump_yaml({"kind": "Policy", **policy}))

    def live_sets() -> int:
        return sum(type(o) is CompiledPolicySet for o in gc.get_objects())

    backend = DirectoryBackend(root)
    store = PolicyStore(backend)
    assert store.reload("startup") is ReloadResult.LOADED
    edit(0)
    assert store.reload("edit") is ReloadResult.LOADED
    first = rss()
    held_after_first = len(backend.cache)
    gc.disable()  # from here on only reference counting frees the replaced sets
    for step in range(1, reloads):
        edit(step)
        assert store.reload("edit") is ReloadResult.LOADED, store.status().last_error
    sets_without_gc = live_sets()
    gc.enable()
    print(json.dumps({
        "first": first,
        "last": rss(),
        "sets_without_gc": sets_without_gc,
        "held_after_first": held_after_first,
        "held_after_last": len(backend.cache),
    }))
    """
)


def test_rss_does_not_grow_across_reloads(tmp_path: Path) -> None:
    root = tmp_path / "policies"
    write_user_policies(root, "acme", MEMORY_POLICIES, templated=True)
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(root), str(RELOADS)],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["sets_without_gc"] == 1  # only the serving set: every replaced one freed
    assert figures["held_after_last"] == figures["held_after_first"]  # the cache is bounded
    assert figures["last"] <= figures["first"] * 1.10, figures
