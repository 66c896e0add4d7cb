"""`spotrunner report` from a recorded run with a preemption: the PNG, the HTML, the cost arithmetic."""

from __future__ import annotations

import base64
import io
import re

import pytest

from spotrunner import history, report
from spotrunner.errors import ConfigError
from spotrunner.report import cost
from tests.support.recorded_run import write_recorded_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A small price table, passed with --prices; the bundled table has no n1-standard-4.
PRICES = """
[machine_types."us-central1"."n1-standard-4"]
on_demand = 0.20
spot = 0.04

[gpus."us-central1"."nvidia-tesla-t4"]
on_demand = 0.35
spot = 0.07
"""


@pytest.fixture
def built(tmp_path):
    write_recorded_run(str(tmp_path / "runs"), "r1", completed=True)
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    out = tmp_path / "out"
    assert report.run(str(tmp_path / "runs"), "r1", str(out), str(prices)) == 0
    return out


def test_timeline_is_a_real_png(built):
    data = (built / "timeline.png").read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    import matplotlib.image

    pixels = matplotlib.image.imread(io.BytesIO(data), format="png")
    assert pixels.shape[:2] == (500, 1200)
    assert pixels.std() > 0.05  # something is drawn, not a blank frame


def test_html_is_self_contained_and_embeds_the_png(built):
    page = (built / "report.html").read_text()
    match = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert match, "the timeline is not embedded as a data URI"
    assert base64.b64decode(match.group(1)) == (built / "timeline.png").read_bytes()
    # No external assets: nothing fetched over the network or from disk.
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "<link" not in page and "@import" not in page

    markdown = (built / "report.md").read_text()
    assert "![Run timeline](timeline.png)" in markdown


def test_cost_rows_match_hand_computed_values(built):
    # Hand arithmetic from tests/support/recorded_run.py's timeline and PRICES above.
    spot_per_hour = 0.04 + 0.07          # n1-standard-4 + one T4, Spot
    on_demand_per_hour = 0.20 + 0.35     # the same, on-demand
    s1_seconds = 1250.0                  # T0 .. T0+1250
    s2_seconds = 3040.0 - 1850.0         # T0+1850 .. T0+3040
    s1_spot = s1_seconds / 3600 * spot_per_hour
    s2_spot = s2_seconds / 3600 * spot_per_hour
    s1_on_demand = s1_seconds / 3600 * on_demand_per_hour
    s2_on_demand = s2_seconds / 3600 * on_demand_per_hour
    spot_total = s1_spot + s2_spot
    on_demand_total = s1_on_demand + s2_on_demand
    saving = on_demand_total - spot_total
    saving_percent = 100 * saving / on_demand_total
    # Interruptions: s2 start -> first step 35 s; notice -> end of s1 10 s; no steps recomputed;
    # snapshot stalls of the 5 non-emergency commit records left in the store, 0.2 s each.
    wasted = 35.0 + 10.0 + 0.0 + 5 * 0.2
    useful_on_demand = (s1_seconds + s2_seconds - wasted) / 3600 * on_demand_per_hour
    net_saving = useful_on_demand - spot_total

    page = (built / "report.html").read_text()
    markdown = (built / "report.md").read_text()
    for value in (s1_spot, s2_spot, s1_on_demand, s2_on_demand, spot_total, on_demand_total, saving,
                  useful_on_demand, net_saving):
        cell = f"${value:,.4f}"
        assert cell in page, f"{cell} missing from report.html"
        assert cell in markdown, f"{cell} missing from report.md"
    assert f"{saving_percent:.1f} %" in page
    assert f"{100 * net_saving / useful_on_demand:.1f} %" in page
    assert "600 s (10m00s)" in page  # the VM was down between the sessions
    costs = page.split("<h2>Cost per session</h2>", 1)[1].split("<h2>", 1)[0]
    row = re.search(r"<tr><td>s1</td>.*?</tr>", costs).group(0)
    assert f"${s1_spot:,.4f}" in row and f"${s1_on_demand:,.4f}" in row and "1,250 s" in row


def test_cost_data_matches_hand_computed_values(tmp_path):
    run = write_recorded_run(str(tmp_path), "r1", completed=True)
    prices_file = tmp_path / "p.toml"
    prices_file.write_text(PRICES)
    prices = cost.load_prices(str(prices_file))
    result = cost.compute(history.read_sessions(run.store), history.read_commits(run.store), prices)
    assert [r["billed_seconds"] for r in result["rows"]] == [1250.0, 1190.0]
    assert result["totals"]["spot_cost"] == pytest.approx(2440 / 3600 * 0.11)
    assert result["totals"]["on_demand_cost"] == pytest.approx(2440 / 3600 * 0.55)
    assert result["interruptions"]["down_seconds"] == 600.0
    assert result["interruptions"]["mean_step_seconds"] == pytest.approx(0.2)
    assert result["interruptions"]["wasted_seconds"] == pytest.approx(46.0)
    assert result["net"]["net_saving"] == pytest.approx((2440 - 46) / 3600 * 0.55 - 2440 / 3600 * 0.11)


def test_performance_figures(tmp_path):
    run = write_recorded_run(str(tmp_path), "r1", completed=True)
    perf = report.performance(history.read_sessions(run.store), history.read_commits(run.store))
    assert [s["img_per_s_median"] for s in perf["sessions"]] == [640.0, 640.0]
    assert [f["seconds"] for f in perf["first_steps"]] == [30.0, 25.0]
    assert perf["checkpoints"]["count"] == 8 and perf["checkpoints"]["commit_seconds_max"] == 1.5
    assert perf["emergency"] == [{"session_id": "s1", "step": 6000, "reason": "preemption", "source": "metadata",
                                  "commit_seconds": 1.5, "notice_to_commit_seconds": 2.0}]


def test_unknown_machine_type_gets_a_note_and_no_number(tmp_path):
    run = write_recorded_run(str(tmp_path / "runs"), "r1", completed=True)
    for key in run.store.list(history.SESSIONS_PREFIX):
        session = history.read_json(run.store, key)
        session["machine_type"] = "n9-weird"
        run.store.put(key, history.encode(session))
    paths = report.build(run.store, str(tmp_path / "out"), cost.load_prices(None))
    page = open(paths["html"]).read()
    markdown = open(paths["markdown"]).read()
    assert "no price for n9-weird in us-central1; pass --prices" in page
    assert "no price for n9-weird in us-central1; pass --prices" in markdown
    costs = page.split("<h2>Cost per session</h2>", 1)[1].split("<h2>", 1)[0]
    session_rows = re.findall(r"<tr><td>(?:s[12]|total)</td>.*?</tr>", costs)
    assert len(session_rows) == 3
    for row in session_rows:
        assert "$" not in row, row
    saving = page.split("<h2>Saving</h2>", 1)[1].split("<h2>", 1)[0]
    assert "$" not in saving


def test_off_gce_session_is_noted_not_priced(tmp_path):
    run = write_recorded_run(str(tmp_path), "r1", completed=True)
    session = history.read_json(run.store, history.session_key("s1"))
    session.update({"machine_type": None, "zone": None, "gpus": [], "provisioning_model": None})
    run.store.put(history.session_key("s1"), history.encode(session))
    prices_file = tmp_path / "p.toml"
    prices_file.write_text(PRICES)
    result = cost.compute(history.read_sessions(run.store), history.read_commits(run.store),
                          cost.load_prices(str(prices_file)))
    assert result["rows"][0]["spot_cost"] is None
    assert result["totals"]["spot_cost"] == pytest.approx(1190 / 3600 * 0.11)
    assert any("off GCE" in note for note in result["notes"])
    assert any("1 priced of 2 sessions" in note for note in result["notes"])


@pytest.mark.parametrize("content, needle", [
    ("this is = = not toml", "not valid TOML"),
    ('[machine_types."us-central1"."n1-standard-4"]\non_demand = "cheap"\nspot = 0.1\n', "on_demand must be a number"),
    ('[machine_types."us-central1"."n1-standard-4"]\non_demand = 0.2\n', "spot must be a number"),
    ('[gpus."us-central1"."nvidia-tesla-t4"]\non_demand = 0.35\nspot = -1\n', "spot must be a number"),
    ('[vms."us-central1"]\n', "unknown top-level key 'vms'"),
])
def test_bad_prices_file_is_a_one_line_config_error(tmp_path, content, needle):
    bad = tmp_path / "prices.toml"
    bad.write_text(content)
    with pytest.raises(ConfigError) as info:
        report.run(str(tmp_path / "runs"), "r1", str(tmp_path / "out"), str(bad))
    message = str(info.value)
    assert needle in message and "\n" not in message and "--prices" in message
    assert info.value.exit_code == 78
    assert not (tmp_path / "out").exists()


def test_missing_prices_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        cost.load_prices(str(tmp_path / "nope.toml"))


def test_bundled_prices_load_and_region_of():
    prices = cost.load_prices(None)
    assert prices["gpus"]["us-central1"]["nvidia-tesla-t4"] == {"on_demand": 0.35, "spot": 0.14}
    assert "2026-11-29" in prices["sources"][0]
    assert cost.region_of("europe-west4-b") == "europe-west4"
    assert cost.region_of(None) is None


def test_gpus_recorded_as_model_names_are_priced_like_accelerator_types(tmp_path):
    # A supervisor that records the driver's model names (["Tesla T4"]) gets the same price.
    run = write_recorded_run(str(tmp_path), "r1", completed=True)
    for key in run.store.list(history.SESSIONS_PREFIX):
        session = history.read_json(run.store, key)
        session["gpus"] = ["Tesla T4"]
        run.store.put(key, history.encode(session))
    prices_file = tmp_path / "p.toml"
    prices_file.write_text(PRICES)
    result = cost.compute(history.read_sessions(run.store), history.read_commits(run.store),
                          cost.load_prices(str(prices_file)))
    assert [r["spot_per_hour"] for r in result["rows"]] == [pytest.approx(0.11), pytest.approx(0.11)]
    assert result["rows"][0]["gpus"] == "1 x nvidia-tesla-t4"
    assert cost.normalise_gpus(["NVIDIA L4", "NVIDIA L4"]) == [{"type": "nvidia-l4", "count": 2}]
    assert cost.normalise_gpus(["Quadro RTX 6000"]) == [{"type": "Quadro RTX 6000", "count": 1}]
