"""The example policies with acme verifying its subject tokens, for dry runs given a JWKS.

The example acme has no `tokens:`: the server reads its tokens unverified and shows policies
none of their claims, so `pdp eval --jwks` refuses it. A dry run of verified tokens needs an
organization that verifies them: this copy gives acme a `tokens:` section (ISSUER, AUDIENCE,
and a jwks_url, for whose keys the dry run's `--jwks` stands in).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.auth.material import AUDIENCE, ISSUER
from tests.scenarios import EXAMPLE_POLICIES


def examples_verifying_tokens(directory: Path) -> Path:
    """A copy of the example policies under `directory`/policies whose acme verifies tokens
    issued by ISSUER for AUDIENCE; returns the copy's root."""
    root = directory / "policies"
    shutil.copytree(EXAMPLE_POLICIES, root)
    # Keys the server would fetch (never fetched here): the dry run's --jwks stands in for
    # them, as it may only for fetched keys (a jwks_file is read as the server reads it).
    with (root / "acme" / "organization.yaml").open("a") as config:
        config.write(
            f"\ntokens:\n  issuer: {ISSUER}\n  audience: {AUDIENCE}\n"
            "  jwks_url: https://idp.acme.test/jwks.json\n"
        )
    return root
