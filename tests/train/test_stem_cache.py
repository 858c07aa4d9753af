"""The stem cache on disk: atomic saves that two runs sharing the cache cannot break."""

from __future__ import annotations

import os

import torch

from leukoscope.train import stem_cache
from leukoscope.train.stem_cache import StemCache


def test_two_caches_saving_the_same_file_at_once_both_succeed(tmp_path, monkeypatch):
    path = tmp_path / "stem" / "key.pt"
    a, b = StemCache(path), StemCache(path)
    a.data["x|0"], b.data["y|0"] = torch.zeros(2), torch.ones(2)
    a._dirty = b._dirty = True
    real_replace = os.replace
    calls = []

    def racing_replace(src, dst):  # b saves between a's write and a's rename: the race of two runs
        calls.append(src)
        if len(calls) == 1:
            b.save()
        real_replace(src, dst)

    monkeypatch.setattr(stem_cache.os, "replace", racing_replace)
    a.save()
    assert len(calls) == 2 and calls[0] != calls[1]  # each wrote its own temporary file
    assert set(StemCache(path).data) == {"x|0"}  # the last rename wins, whole
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]  # nothing left behind
