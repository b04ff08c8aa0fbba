"""Retention is a pure function: keep last K + the best model's source + pinned ones."""


import pytest

from ckptctl.core.retention import RetentionItem, ids_to_delete, protected_ids, should_keep


def items(ids, pinned=(), sizes=None):
    return [RetentionItem(id=i, size_bytes=(sizes or {}).get(i, 10), pinned=i in pinned) for i in ids]


def test_keeps_last_k_by_id_not_by_list_order():
    listed = items([4, 0, 3, 1, 2])
    assert ids_to_delete(listed, keep_last=2) == [0, 1, 2]
    assert should_keep(listed, keep_last=2) == [True, False, True, False, False]


def test_best_source_and_pinned_are_kept_on_top_of_k():
    listed = items(range(8), pinned={2})
    assert ids_to_delete(listed, keep_last=2, best_source_id=0) == [1, 3, 4, 5]


def test_best_source_that_no_longer_exists_is_ignored():
    assert ids_to_delete(items(range(4)), keep_last=1, best_source_id=99) == [0, 1, 2]


def test_newest_good_checkpoint_is_never_deleted_even_if_not_highest():
    # the newest file is corrupt: the newest *good* one (id 2) survives keep_last=1
    assert ids_to_delete(items(range(4)), keep_last=1, newest_good_id=2) == [0, 1]


def test_max_size_drops_oldest_unprotected_until_it_fits():
    listed = items(range(5), sizes={0: 100, 1: 100, 2: 100, 3: 100, 4: 100})
    assert ids_to_delete(listed, max_total_bytes=250) == [0, 1, 2]
    # protected ones never go, even if the budget cannot be met
    assert ids_to_delete(listed, max_total_bytes=0, best_source_id=1) == [0, 2, 3]


def test_rules_combine():
    listed = items(range(6), sizes={i: 100 for i in range(6)})
    assert ids_to_delete(listed, keep_last=4, max_total_bytes=300, best_source_id=0) == [1, 2, 3]


def test_no_rules_keeps_everything_and_empty_input_is_fine():
    assert ids_to_delete(items(range(3))) == []
    assert should_keep([], keep_last=3) == []
    assert protected_ids([]) == set()


@pytest.mark.parametrize("bad", [0, -1])
def test_keep_last_must_be_positive(bad):
    with pytest.raises(ValueError):
        should_keep(items([1]), keep_last=bad)


def test_exhaustive_invariants_on_small_cases():
    """For every small combination: exactly the rule's set survives."""
    for n in range(0, 6):
        ids = list(range(n))
        for k in range(1, 5):
            for best in [None] + ids:
                for pinned_bits in range(2 ** n):
                    pinned = {i for i in ids if pinned_bits >> i & 1}
                    keep = should_keep(items(ids, pinned=pinned), keep_last=k, best_source_id=best)
                    expected = set(ids[-k:]) | pinned | ({best} if best is not None else set())
                    assert {i for i, kept in zip(ids, keep) if kept} == expected


def test_protection_reasons_say_why_each_protected_id_stays():
    from ckptctl.core.retention import protection_reasons

    items = [RetentionItem(1, pinned=True), RetentionItem(2), RetentionItem(3), RetentionItem(4)]
    assert protection_reasons(items, best_source_id=1, newest_good_id=3) == {
        1: "pinned, best model's source",
        3: "newest verified",
    }
    assert protection_reasons(items) == {1: "pinned", 4: "newest (none verifies)"}
