"""The example policies with acme verifying its subject tokens, for dry runs given a JWKS.

The example acme has no `tokens:`: the server reads its tokens unverified and shows policies
none of their claims, so `pdp eval --jwks` refuses it. A dry run of verified tokens needs an
organization that verifies them: this copy gives acme a `tokens:` section (ISSUER, AUDIENCE,
and a JWKS of a throwaway key, for which the dry run's `--jwks` stands in).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.auth.material import AUDIENCE, ISSUER, ed_key, jwks
from tests.scenarios import EXAMPLE_POLICIES


def examples_verifying_tokens(directory: Path) -> Path:
    """A copy of the example policies under `directory`/policies whose acme verifies tokens
    issued by ISSUER for AUDIENCE; returns the copy's root."""
    root = directory / "policies"
    shutil.copytree(EXAMPLE_POLICIES, root)
    acme = root / "acme"
    (acme / "idp-jwks.json").write_text(jwks(ed_key("acme-idp")))
    with (acme / "organization.yaml").open("a") as config:
        config.write(
            f"\ntokens:\n  issuer: {ISSUER}\n  audience: {AUDIENCE}\n  jwks_file: idp-jwks.json\n"
        )
    return root
