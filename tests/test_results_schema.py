"""sdxl_core.results_schema: the rule that folds result lines, shared by the run log and the report."""

from sdxl_core.results_schema import keep_newest


def test_newest_line_wins_but_ok_is_never_replaced_by_an_error():
    latest: dict = {}
    keep_newest(latest, "a", {"status": "error", "message": "first"})
    assert latest["a"]["message"] == "first"
    keep_newest(latest, "a", {"status": "ok", "seconds": 1.0})
    keep_newest(latest, "a", {"status": "error", "message": "late retry"})
    assert latest["a"] == {"status": "ok", "seconds": 1.0}
    keep_newest(latest, "a", {"status": "ok", "seconds": 2.0})  # a newer ok line does replace it
    keep_newest(latest, ("b", 0, 1), {"status": "error"})  # any hashable key
    assert latest == {"a": {"status": "ok", "seconds": 2.0}, ("b", 0, 1): {"status": "error"}}
