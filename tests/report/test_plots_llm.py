"""report.png of a causal LM's run plots perplexity where a classifier's plots accuracy."""

from __future__ import annotations

from pathlib import Path

from fedq.report import plot_report


def test_a_causal_lm_run_plots_perplexity(tmp_path: Path, monkeypatch) -> None:
    import fedq.report.plots as plots

    seen: list[str] = []
    real = plots._series

    def spy(records, xs, key):
        seen.append(key)
        return real(records, xs, key)

    monkeypatch.setattr(plots, "_series", spy)
    records = [
        {
            "round": r,
            "accuracy": None,
            "perplexity": 9.0 - r,
            "mean_bits": 4.0,
            "bytes_up": 10,
            "bytes_down": 10,
        }
        for r in range(3)
    ]
    out = plot_report(records, tmp_path / "report.png")
    assert out.stat().st_size > 0
    assert seen[:2] == ["perplexity", "perplexity"]
    seen.clear()
    plot_report([{**r, "accuracy": 0.5} for r in records], tmp_path / "b.png")
    assert seen[:2] == ["accuracy", "accuracy"]
