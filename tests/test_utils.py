"""Atomic outputs: readers see the old file or the complete new one, never a partial write."""

from __future__ import annotations

import os

import pytest

from modelkin.utils import atomic_path, atomic_write_text, human_bytes


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert sorted(os.listdir(tmp_path)) == ["out.json"]


def test_interrupted_write_keeps_previous_file(tmp_path):
    target = tmp_path / "report.html"
    target.write_text("previous")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half-writ")
            raise KeyboardInterrupt
    assert target.read_text() == "previous"
    assert os.listdir(tmp_path) == ["report.html"]


def test_atomic_directory(tmp_path):
    target = tmp_path / "ckpt"
    for payload in ("a", "b"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "config.json").write_text(payload)
    assert (target / "config.json").read_text() == "b"
    assert os.listdir(tmp_path) == ["ckpt"]


def test_human_bytes():
    assert human_bytes(999) == "999 B"
    assert human_bytes(1_500_000_000) == "1.50 GB"
