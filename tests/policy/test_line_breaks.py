"""A policy file cannot hide a key after what reads as a comment: NEL, LS and PS end a line for
YAML 1.1 readers (PyYAML, libyaml) but not for YAML 1.2, editors, grep or a diff, so they are
refused anywhere in a policy or config file, quoted or not. Real files, the real loader."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy_engine.config import ConfigError, load_settings
from policy_engine.domain.decision import Effect
from policy_engine.policy import PolicyLoadError, load_policy_set
from tests.scenarios import pdp
from tests.store.support import decide_scope, org_policy, write_policy_dir

BREAKS = ["\u2028", "\u2029", "\x85"]


def _hidden_override(line_break: str) -> str:
    """The deny rule with `condition: 'false'` appended after a "comment" on its effect line."""
    text = org_policy(allow=["repo", "delete_repo"], deny=["delete_repo"])
    lines = text.splitlines(keepends=True)
    deny_effect = next(
        i for i, line in enumerate(lines) if line.strip() == "effect: deny" and i > 0
    )
    lines[deny_effect] = (
        f"    effect: deny   # reviewed by security{line_break}    condition: 'false'\n"
    )
    return "".join(lines)


@pytest.mark.parametrize("line_break", BREAKS, ids=["LS", "PS", "NEL"])
def test_a_key_hidden_behind_a_comment_is_refused(tmp_path: Path, line_break: str) -> None:
    honest = load_policy_set(
        write_policy_dir(tmp_path / "honest", org_policy(["repo", "delete_repo"], ["delete_repo"]))
    )
    assert decide_scope(honest, "delete_repo").effect is Effect.DENY
    root = write_policy_dir(tmp_path / "tricked", _hidden_override(line_break))
    with pytest.raises(PolicyLoadError) as caught:
        load_policy_set(root)
    message = str(caught.value)
    assert f"U+{ord(line_break):04X} is not allowed in policy files" in message
    assert "org.yaml:" in message
    validate = pdp("validate", str(root))
    assert validate.returncode != 0
    assert "Traceback" not in validate.stderr


@pytest.mark.parametrize("line_break", BREAKS, ids=["LS", "PS", "NEL"])
def test_quoted_text_holding_one_is_refused_too(tmp_path: Path, line_break: str) -> None:
    text = org_policy(["repo"]).replace(
        "kind: Policy", f"kind: Policy\ndescription: 'a{line_break}b'"
    )
    with pytest.raises(PolicyLoadError, match="is not allowed in policy files"):
        load_policy_set(write_policy_dir(tmp_path, text))


def test_the_config_file_refuses_them(tmp_path: Path) -> None:
    config = tmp_path / "pdp.yaml"
    config.write_text("workers: 1  # one\u2028workers: 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="U\\+2028 is not allowed in config files"):
        load_settings(config, environ={})
