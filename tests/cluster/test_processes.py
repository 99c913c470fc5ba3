"""What `darkgpu down` clears besides its processes: Ray's note of the current cluster, when
it is this cluster's (a plain `ray.init()` would try to reach the stopped one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.processes import forget_address, session_of


def test_only_this_clusters_address_note_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    note = tmp_path / "ray" / "ray_current_cluster"
    note.write_text("10.0.0.5:6400")
    forget_address(6390)  # another cluster's note stays
    assert note.read_text() == "10.0.0.5:6400"
    forget_address(6400)
    assert not note.exists()
    forget_address(6400)  # nothing to remove: no error


def test_no_cluster_listens_on_an_unused_port() -> None:
    assert session_of(1) is None
