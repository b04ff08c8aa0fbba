"""The index and best metadata: round trips and hostile content."""

import json
import math
import re

import pytest

from ckptctl.core.manifest import BestInfo, CheckpointEntry, Index, clean_metrics, parse_checksum
from ckptctl.errors import CorruptIndexError, UnsafePathError

SUM = "sha256:" + "ab" * 32


def entry(i, **kw):
    data = dict(id=i, path=f"checkpoints/checkpoint_{i:05d}.pt", epoch=0, batch=i, global_step=i + 1,
                metrics={"loss": 0.5}, timestamp="2026-01-01T00:00:00+00:00", size_bytes=100, checksum=SUM)
    data.update(kw)
    return data


def test_index_round_trip_through_json():
    index = Index.from_dict({"format_version": 1, "run_name": "r", "next_id": 9, "checkpoints": [entry(3), entry(1)]})
    assert [c.id for c in index.checkpoints] == [1, 3]
    assert index.next_id == 9
    again = Index.from_dict(json.loads(json.dumps(index.to_dict())))
    assert again == index


def test_next_id_is_never_below_an_existing_id():
    index = Index.from_dict({"format_version": 1, "run_name": "r", "next_id": 0, "checkpoints": [entry(4)]})
    assert index.next_id == 5


def test_nan_metrics_survive_as_null():
    e = CheckpointEntry.from_dict(entry(0, metrics={"loss": None, "acc": 1}))
    assert math.isnan(e.metrics["loss"]) and e.metrics["acc"] == 1.0
    assert json.loads(json.dumps(e.to_dict(), allow_nan=False))["metrics"]["loss"] is None


@pytest.mark.parametrize(
    "bad_entry,reason",
    [
        (entry(1, path="../../x"), "leaves"),
        (entry(1, path="/etc/passwd"), "absolute"),
        (entry(1, checksum="md5:abc"), "algorithm"),
        (entry(1, size_bytes="big"), "size_bytes"),
        (entry(1, id=True), "id"),
        ("not an object", "not an object"),
    ],
)
def test_one_bad_entry_is_skipped_and_reported(bad_entry, reason):
    index = Index.from_dict({"format_version": 1, "run_name": "r", "next_id": 0, "checkpoints": [entry(0), bad_entry]})
    assert [c.id for c in index.checkpoints] == [0]
    assert len(index.skipped) == 1 and reason in index.skipped[0][1]


def test_duplicate_ids_keep_the_first():
    index = Index.from_dict({"format_version": 1, "run_name": "r", "next_id": 0, "checkpoints": [entry(0), entry(0, batch=5)]})
    assert len(index.checkpoints) == 1 and index.checkpoints[0].batch == 0
    assert "duplicate" in index.skipped[0][1]


@pytest.mark.parametrize(
    "doc",
    [[], "x", {"checkpoints": []}, {"format_version": 1}, {"format_version": 1, "checkpoints": {}}, {"format_version": 99, "checkpoints": []}],
)
def test_malformed_index_raises(doc):
    with pytest.raises(CorruptIndexError):
        Index.from_dict(doc)


def test_best_info_round_trip_and_rejects_escaping_path():
    best = BestInfo(path="best_model.pt", source_id=4, epoch=1, batch=2, global_step=3, metrics={"a": 1.0},
                    timestamp="t", size_bytes=5, checksum=SUM, metric="a", mode="max", value=1.0)
    assert BestInfo.from_dict(json.loads(json.dumps(best.to_dict()))) == best
    hostile = dict(best.to_dict(), path="../../etc/shadow")
    with pytest.raises(UnsafePathError, match="leaves the run directory: '../../etc/shadow'"):
        BestInfo.from_dict(hostile)


def test_checksum_parsing_and_metric_cleaning():
    assert parse_checksum(SUM) == ("sha256", "ab" * 32)
    assert parse_checksum("xxh3_128:00ff") == ("xxh3_128", "00ff")
    for bad, error in (("sha256", "malformed checksum 'sha256'"), ("sha256:", "malformed checksum digest ''"),
                       ("sha256:XYZ", "malformed checksum digest 'XYZ'"), ("crc:00", "unknown checksum algorithm 'crc'")):
        with pytest.raises(ValueError, match=f"^{re.escape(error)}$"):
            parse_checksum(bad)
    import torch

    assert clean_metrics({"loss": torch.tensor(0.5), "n": 3}) == {"loss": 0.5, "n": 3.0}


def test_rewriting_an_index_keeps_unusable_entries_as_they_were():
    hostile = entry(5, path="../../x")
    index = Index.from_dict({"format_version": 1, "run_name": "r", "next_id": 0, "checkpoints": [entry(0), hostile]})
    written = index.with_entries(list(index.checkpoints) + [CheckpointEntry.from_dict(entry(1))]).to_dict()
    assert hostile in written["checkpoints"]
    again = Index.from_dict(written)
    assert [c.id for c in again.checkpoints] == [0, 1] and again.skipped[0][0] == 5


@pytest.mark.parametrize("raw", [entry(0, path="checkpoints/checkpoint_00009.pt"), entry(2**64 + 5, path="checkpoints/checkpoint_00000.pt")])
def test_an_entry_whose_file_name_carries_another_id_is_skipped_and_kept(raw):
    from ckptctl.errors import UnsafePathError

    with pytest.raises(UnsafePathError, match="not the file of checkpoint"):
        CheckpointEntry.from_dict(raw)
    index = Index.from_dict({"format_version": 1, "run_name": "r", "next_id": 10, "checkpoints": [raw, entry(9)]})
    assert [c.id for c in index.checkpoints] == [9] and index.skipped[0][0] == raw["id"]
    assert index.next_id == 10  # a skipped entry does not move the counter
    assert raw in index.to_dict()["checkpoints"]  # written back unchanged
    assert CheckpointEntry.from_dict(entry(3, path="checkpoints/./checkpoint_00003.pt")).path == "checkpoints/checkpoint_00003.pt"


def test_tombstones_round_trip_and_keep_the_id_counter_ahead():
    index = Index.from_dict({"format_version": 1, "run_name": "r", "next_id": 0, "checkpoints": [entry(2)],
                             "deleting": [7, 0, "x", -1, True, 2]})
    assert index.deleting == (0, 7)  # junk dropped; a listed id is never a tombstone (the entry wins)
    assert index.next_id == 8  # ids of files being deleted are never reused
    assert Index.from_dict(json.loads(json.dumps(index.to_dict()))) == index
    marked = index.mark_deleting([2, 3])  # 2 is still listed: not marked
    assert marked.deleting == (0, 3, 7)
    cleared = marked.forget_deleting([0, 3, 7])
    assert cleared.deleting == () and "deleting" not in cleared.to_dict() and cleared.next_id == 8
    relisted = marked.with_entries(list(marked.checkpoints) + [CheckpointEntry.from_dict(entry(3))])
    assert relisted.deleting == (0, 7)
