"""A load resolves each folder's real path once and opens its files without following a link
in their last part: the real path it records must still be exactly os.path.realpath's, and
every refusal the same, whatever links the tree holds. Real trees on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from policy_engine.config import PolicyLimits
from policy_engine.policy.source import (
    DirectorySource,
    SourceError,
    read_bounded,
    read_snapshot,
)


def linked_tree(root: Path) -> list[str]:
    """A tree with every kind of link a deploy uses, and the paths to read through it."""
    versions = root / "..2024_01_01"
    (versions / "acme" / "users").mkdir(parents=True)
    (versions / "acme" / "org.yaml").write_text("kind: Policy\n")
    (versions / "acme" / "users" / "u1.yaml").write_text("kind: Policy\n")
    (root / "..data").symlink_to(versions.name)  # Kubernetes' swap link
    (root / "acme").symlink_to("..data/acme")  # a linked folder
    (root / "plain").mkdir()
    (root / "plain" / "a.yaml").write_text("a: 1\n")
    (root / "plain" / "link.yaml").symlink_to("a.yaml")  # a linked file
    (root / "plain" / "chain.yaml").symlink_to("link.yaml")  # a link to a link
    (root / "plain" / "out.yaml").symlink_to(versions / "acme" / "org.yaml")  # absolute
    (root / "plain" / "dangling.yaml").symlink_to("gone.yaml")
    (root / "plain" / "dir.yaml").mkdir()
    os.mkfifo(root / "plain" / "pipe.yaml")
    (root / "plain" / "loop.yaml").symlink_to("loop.yaml")
    (root / "plain" / "sub").symlink_to("../acme/users")  # a link through a link
    return [
        "acme/org.yaml",
        "acme/users/u1.yaml",
        "plain/a.yaml",
        "plain/link.yaml",
        "plain/chain.yaml",
        "plain/out.yaml",
        "plain/dangling.yaml",
        "plain/dir.yaml",
        "plain/pipe.yaml",
        "plain/loop.yaml",
        "plain/missing.yaml",
        "plain/sub/u1.yaml",
        "plain/sub/../a.yaml",
        "acme/users/../org.yaml",
    ]


def outcome(read: object) -> tuple[str, str | bytes]:
    try:
        file = read()  # type: ignore[operator]
    except SourceError as exc:
        return ("refused", str(exc))
    return (file.real_path, file.data)


@pytest.mark.parametrize("relative_root", [False, True], ids=["absolute", "relative"])
def test_shared_folder_resolution_records_what_realpath_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relative_root: bool
) -> None:
    names = linked_tree(tmp_path / "policies")
    root = tmp_path / "policies"
    if relative_root:
        monkeypatch.chdir(tmp_path)
        root = Path("policies")
    shared: dict[str, str] = {}
    source = DirectorySource(root, PolicyLimits())
    for name in names * 2:  # the second time, every folder is known
        alone = outcome(lambda name=name: read_bounded(root / name, 1 << 20))
        assert outcome(lambda name=name: read_bounded(root / name, 1 << 20, shared)) == alone
        assert outcome(lambda name=name: source.read(name)) == alone
        if alone[0] != "refused":
            assert alone[0] == os.path.realpath(root / name)
    assert shared  # folders were resolved once and reused
    files, _, problems = read_snapshot(root, names)
    for name in names:
        alone = outcome(lambda name=name: read_bounded(root / name, 1 << 20))
        if name in files:
            assert (files[name].real_path, files[name].data) == alone
        else:
            assert f"{name}: {alone[1]}" in problems


def test_a_file_swapped_for_a_link_between_loads_is_resolved_again(tmp_path: Path) -> None:
    root = tmp_path / "policies"
    (root / "acme").mkdir(parents=True)
    (root / "acme" / "org.yaml").write_text("a: 1\n")
    (tmp_path / "elsewhere.yaml").write_text("b: 2\n")
    first = DirectorySource(root).read("acme/org.yaml")
    assert first.real_path == str(root / "acme" / "org.yaml")
    (root / "acme" / "org.yaml").unlink()
    (root / "acme" / "org.yaml").symlink_to(tmp_path / "elsewhere.yaml")
    second = DirectorySource(root).read("acme/org.yaml")
    assert (second.real_path, second.data) == (str(tmp_path / "elsewhere.yaml"), b"b: 2\n")
