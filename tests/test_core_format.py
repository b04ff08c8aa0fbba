"""The pure format layer: naming and metadata path rules."""

import datetime as dt

import pytest

from ckptctl.core import format as fmt
from ckptctl.errors import UnsafePathError


def test_checkpoint_names_carry_the_id_and_round_trip():
    assert fmt.checkpoint_filename(7) == "checkpoint_00007.pt"
    assert fmt.checkpoint_relpath(123456) == "checkpoints/checkpoint_123456.pt"
    for i in (0, 7, 99999, 100000, 1234567):
        assert fmt.parse_checkpoint_filename(fmt.checkpoint_filename(i)) == i
    with pytest.raises(ValueError, match="checkpoint id must be >= 0, got -1"):
        fmt.checkpoint_filename(-1)


@pytest.mark.parametrize(
    "name",
    ["checkpoint_7.pt", "checkpoint_00007.pt.tmp", ".ckptctl-tmp-checkpoint_00007.pt.ab12", "best_model.pt", "checkpoint_0000a.pt"],
)
def test_non_checkpoint_names_are_not_parsed(name):
    assert fmt.parse_checkpoint_filename(name) is None


@pytest.mark.parametrize(
    "name",
    [
        "checkpoint_00002.pt\n",  # re.match with $ accepted it: it shadowed checkpoint 2 after an index rebuild
        "checkpoint_00002.pt\r",
        "checkpoint_00002.pt ",
        " checkpoint_00002.pt",
        "checkpoint_\u0660\u0660\u0660\u0660\u0663.pt",  # Arabic-Indic digits: \\d took them as id 3
        "checkpoint_\uff10\uff10\uff10\uff10\uff13.pt",  # fullwidth digits
        "checkpoint_00002.pt\udcff",  # a non-UTF-8 byte, as os.listdir decodes it
    ],
)
def test_names_that_only_look_like_checkpoints_are_not_parsed(name):
    assert fmt.parse_checkpoint_filename(name) is None


def test_temporaries_are_recognised():
    assert fmt.is_temporary_name(fmt.TEMP_PREFIX + "checkpoint_00001.pt.1234")
    assert not fmt.is_temporary_name("checkpoint_00001.pt")


def test_default_run_name_format():
    assert fmt.default_run_name(dt.datetime(2026, 1, 2, 3, 4, 5)) == "arc_complete_20260102_030405"


def test_utc_timestamp_is_iso_with_offset():
    stamp = fmt.utc_now_iso()
    parsed = dt.datetime.fromisoformat(stamp)
    assert parsed.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize("good,normalised", [("checkpoints/checkpoint_00001.pt", None), ("a/./b", "a/b"), ("a/../b", "b")])
def test_relative_paths_inside_the_run_are_accepted(good, normalised):
    assert fmt.check_relative_path(good) == (normalised or good)


@pytest.mark.parametrize(
    "bad",
    ["", "/etc/passwd", "../x", "../../x", "a/../../x", "..", ".", "C:/x", "a\\..\\..\\x", "a\x00b", None, 5, ["a"]],
)
def test_paths_that_leave_the_run_are_rejected(bad):
    with pytest.raises(UnsafePathError):
        fmt.check_relative_path(bad)
