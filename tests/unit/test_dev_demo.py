"""The live view of ``pullwake dev``: rows, settling and rendering (pure parts)."""

from __future__ import annotations

from pullwake.dev.demo import EntityRow, render


def test_rows_track_wakes_once_and_settle_when_acked_and_resolved() -> None:
    row = EntityRow("/live/a")
    row.track("wk_1")
    row.track("wk_1")
    row.track(None)
    assert row.wakes == ["wk_1"]
    row.acked, row.tail = 1, 1
    row.timings["wk_1"] = ("claimed", 12.0, None)
    assert not row.settled
    row.timings["wk_1"] = ("completed", 12.0, 150.4)
    assert row.settled


def test_render_shows_entity_status_progress_and_latencies() -> None:
    done = EntityRow("/live/a", "idle", 2, 2, ["wk_1", "wk_2"])
    done.timings = {"wk_1": ("completed", 9.0, 160.0), "wk_2": ("completed", 11.2, 170.6)}
    busy = EntityRow("/live/b", "running", 0, 1, ["wk_3"], {"wk_3": ("claimed", 8.0, None)})
    fresh = EntityRow("/live/c")
    lines = render(
        "runner dev-runner (streaming, online): 3 wake(s) seen, 2 done", [done, busy, fresh]
    )
    assert lines[0].startswith("runner dev-runner (streaming")
    assert "wake → claim → done" in lines[1]
    assert lines[2].split()[:3] == ["/live/a", "idle", "2/2"]
    assert lines[2].endswith("2 wake(s), last completed: 11 ms → 171 ms")
    assert lines[3].endswith("1 wake(s), last claimed: 8 ms → …")
    assert lines[4].split() == ["/live/c", "idle", "0/0", "-"]


def test_the_view_prints_only_the_final_frame_off_a_terminal() -> None:
    import io

    from pullwake.dev.demo import _View

    out = io.StringIO()
    view = _View(out)
    view.draw(["frame 1"])
    view.draw(["frame 2", "  row"], final=True)
    assert out.getvalue() == "frame 2\n  row\n"


def test_the_view_redraws_in_place_on_a_terminal() -> None:
    import io

    from pullwake.dev.demo import _View

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    view = _View(out)
    assert view.live is not None
    view.draw(["frame 1"])
    view.draw(["frame 2"], final=True)
    shown = out.getvalue()
    assert shown.index("frame 1") < shown.index("\x1b[2K") < shown.index("frame 2")  # erased
    assert shown.endswith("frame 2\n\x1b[?25h")  # left on screen, cursor shown again
    assert not view.live.is_started
