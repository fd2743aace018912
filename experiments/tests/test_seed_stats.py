"""Mean ± std over seeds (experiments/seed_stats.py): the study's and the sweep's report formats."""

from seed_stats import format_mean_std, mean_std


def test_the_study_and_the_sweep_formats():
    assert mean_std([0.5, None, float("nan"), 0.7]) == (0.6, mean_std([0.5, 0.7])[1])
    assert format_mean_std([0.5, 0.7]) == "60.0 ± 14.1"  # the study: fractions shown as percent
    assert format_mean_std([0.5]) == "50.0 ± 0.0"
    assert format_mean_std([0.1234], scale=1.0, digits=3) == "0.123 ± 0.000"
    assert format_mean_std([52.34], scale=1.0, lone_std=False) == "52.3"  # the sweep: points already, one seed alone
    assert format_mean_std([50.0, 52.0], scale=1.0, lone_std=False) == "51.0 ± 1.4"
    assert format_mean_std([]) == format_mean_std([None, float("nan")]) == "n/a"
