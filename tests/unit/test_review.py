"""``detector review`` and ``detector label`` without a broker: grouping, ordering, rendering, label records and
the command line's one-line errors. Against the real broker: tests/integration/test_end_to_end.py."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from detector import cli, review
from detector.ratelimit import DecisionBook, _example_record
from detector.schemas import LABEL_SCHEMA, InvalidEvent, validate

NOW_S = 1_775_000_100.0
C_X, C_SMALL, C_BIG, C_1 = "c_00000000000a", "c_00000000000b", "c_00000000000c", "c_000000000001"


def _record(account: str, action: str, score: float, cluster: str | None, *, emitted_at: int = 1_775_000_000_000,
            reasons: list[dict[str, Any]] | None = None) -> bytes:
    rec = orjson.loads(_example_record(account, action, score=score, emitted_at=emitted_at))
    rec["cluster_id"] = cluster
    if reasons is not None:
        rec["reasons"] = reasons
    return orjson.dumps(rec)


def _book(*records: tuple[str, bytes | None]) -> DecisionBook:
    book = DecisionBook(wall_clock=lambda: NOW_S)
    for key, value in records:
        book.apply(key.encode(), value)
    return book


def _reason(code: str, weight: float) -> dict[str, Any]:
    return {"code": code, "detail": f"{code} detail", "weight": weight}


def test_latest_record_per_account_counts_as_the_limiter_would() -> None:
    book = _book(("a1", _record("a1", "block", 0.95, C_X)),
                 ("a1", _record("a1", "allow", 0.1, C_X, emitted_at=1_774_000_000_000)),  # older: ignored
                 ("a2", _record("a2", "throttle", 0.7, C_X)),
                 ("a2", None),  # tombstone: a2 is back to no record
                 ("a3", b"{not json"))
    views = review.select(book.decisions())
    assert [(v.cluster_id, [d.account_id for d in v.accounts]) for v in views] == [(C_X, ["a1"])]
    assert book.invalid_total() == 1


def test_clusters_worst_first_and_accounts_worst_first_within() -> None:
    book = _book(("a1", _record("a1", "throttle", 0.72, C_SMALL)),
                 ("b1", _record("b1", "throttle", 0.8, C_BIG)),
                 ("b2", _record("b2", "block", 0.91, C_BIG)),
                 ("b3", _record("b3", "watch", 0.5, C_BIG)),
                 ("z1", _record("z1", "block", 0.99, None)))
    views = review.select(book.decisions())
    assert [v.cluster_id for v in views] == [None, C_BIG, C_SMALL]  # block 0.99, block 0.91, throttle 0.72
    assert [d.account_id for d in views[1].accounts] == ["b2", "b1"]  # watch is not listed by default
    watch = review.select(book.decisions(), actions=("watch",))
    assert [d.account_id for v in watch for d in v.accounts] == ["b3"]
    assert [v.cluster_id for v in review.select(book.decisions(), cluster=C_SMALL)] == [C_SMALL]


def test_accounts_asked_for_are_listed_at_any_action() -> None:
    book = _book(("a1", _record("a1", "allow", 0.1, C_1)), ("a2", _record("a2", "block", 0.9, C_1)),
                 ("a3", _record("a3", "watch", 0.4, None)))
    views = review.select(book.decisions(), accounts=["a1", "a3", "nobody"])
    assert sorted(d.account_id for v in views for d in v.accounts) == ["a1", "a3"]


def test_since_keeps_only_recent_records() -> None:
    book = _book(("old", _record("old", "block", 0.9, C_1, emitted_at=1_774_000_000_000)),
                 ("new", _record("new", "block", 0.9, C_1, emitted_at=1_775_000_000_000)))
    views = review.select(book.decisions(), since_ms=1_774_500_000_000)
    assert [d.account_id for v in views for d in v.accounts] == ["new"]


def test_reasons_are_counted_over_each_accounts_strongest_three() -> None:
    strong = [_reason("linked_to_blocked", 0.6), _reason("shared_payment", 0.2), _reason("cluster_size", 0.1),
              _reason("cot_requests", 0.05)]
    other = [_reason("shared_payment", 0.5), _reason("cot_requests", 0.3)]
    book = _book(("a1", _record("a1", "block", 0.9, C_1, reasons=strong)),
                 ("a2", _record("a2", "block", 0.9, C_1, reasons=other)))
    view = review.select(book.decisions())[0]
    assert dict(view.reasons()) == {"shared_payment": 2, "linked_to_blocked": 1, "cluster_size": 1,
                                    "cot_requests": 1}  # a1's cot_requests is its 4th: not counted


def test_render_and_json_show_the_cluster_and_its_members() -> None:
    book = _book(*((f"a{i}", _record(f"a{i}", "block", 0.9 - i / 100, C_1,
                                     reasons=[_reason("linked_to_blocked", 0.8)])) for i in range(7)))
    views = review.select(book.decisions())
    lines = review.render(views, per_cluster=3)
    assert lines[0].startswith("cluster c_000000000001: 7 accounts (7 block), max score 0.90, last event 2026-")
    assert lines[1] == "  reasons: linked_to_blocked (7)"
    assert [ln.split()[0] for ln in lines[2:5]] == ["a0", "a1", "a2"]
    assert "linked_to_blocked detail" in lines[2]
    assert lines[5] == "  ... and 4 more (--per-cluster N, or --json)"
    doc = views[0].to_json()
    assert doc["accounts"] == 7 and doc["actions"] == {"block": 7} and len(doc["members"]) == 7
    assert orjson.loads(orjson.dumps(doc)) == doc


def test_labels_are_schema_valid_keyed_by_account_and_deduplicated() -> None:
    labels = review.build_labels(["a1", "a2", "a1"], "attack", "alice", note="SOC-1", now_ms=1_775_000_000_000)
    assert [k for k, _ in labels] == [b"a1", b"a2"]
    for key, value in labels:
        rec = validate(LABEL_SCHEMA, orjson.loads(value))
        assert rec["account_id"].encode() == key and rec["label"] == "attack" and rec["note"] == "SOC-1"


def test_a_bad_label_raises_before_anything_is_built() -> None:
    with pytest.raises(InvalidEvent, match="note"):
        review.build_labels(["a1"], "attack", "alice", note="x" * 513, now_ms=1_775_000_000_000)


@pytest.mark.parametrize(("argv", "message"), [
    (["label", "attack", "--analyst", "alice"], "name the accounts to label, or --cluster ID"),
    (["label", "attack", "bad id", "--analyst", "alice"], "must match pattern"),
    (["review", "--since", "6 hours"], "--since: '6 hours' is not a duration"),
])
def test_cli_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETECTOR_KAFKA__BOOTSTRAP", "127.0.0.1:1")  # never reached: the input is refused first
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("detector: error: ") and message in err
