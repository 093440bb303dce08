"""The pipeline's end-of-run summary (flows/summary.py): what a retrain did, in the words an operator
needs: the data version and what it added, each training (warm-started from what, or skipped), the
evaluations and the promotion decisions; or that nothing changed."""

from flows.summary import summary_markdown

V2 = {"name": "mytable", "version": 2, "images": 768, "rows_added": 256, "rows_removed": 3,
      "content_hash": "a30f1e3c0a2a99", "fresh": True}


def test_a_retrain_on_a_new_version_says_what_changed_and_what_ran():
    runs = [{"run_dir": "s3://b/runs/tiny-cloob-mytable-v2-0e1acff355", "step": 30,
             "init_from": {"ref": "champion", "entry": "ac5a682b1301ffff"}},
            {"run_dir": "s3://b/runs/tiny-clip-mytable-v2-1f2e3d4c5b", "step": 30, "init_from": None},
            {"run_dir": "s3://b/runs/tiny-clip-mytable-v1-9a8b7c6d5e", "step": 30, "skipped": True}]
    md = summary_markdown([V2], runs, 4, 1, [{"challenger": "ac5a682b1301ffff", "promoted": False,
                                              "reason": "gain -0.4 points is not above min_gain 0"}])
    assert "| mytable | v2 | 768 | 256 | 3 | a30f1e3c0a2a | prepared |" in md
    assert "| tiny-cloob-mytable-v2-0e1acff355 | 30 | trained, warm-started from champion (ac5a682b1301) |" in md
    assert "| tiny-clip-mytable-v2-1f2e3d4c5b | 30 | trained from scratch |" in md
    assert "skipped: already trained on this data version" in md and "4 evaluated, 1 failed" in md
    assert "ac5a682b1301: not promoted (gain -0.4 points is not above min_gain 0)" in md


def test_an_unchanged_source_says_nothing_to_do():
    same = {**V2, "fresh": False}
    md = summary_markdown([same], [{"run_dir": "r", "step": 30, "skipped": True}], 0, 0, [])
    assert md.endswith("No change since version 2 of mytable (768 images, content hash a30f1e3c0a2a): nothing to do.")
    # new data but nothing trained (no recipes) is not "no change"
    assert "No change" not in summary_markdown([V2], [], 0, 0, [])
