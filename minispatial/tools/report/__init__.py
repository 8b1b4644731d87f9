"""`minispatial report RUN [RUN ...] --out report.html`: one self-contained HTML page of one or
more training runs (figures as base64 PNG data: URIs, inline CSS, no JavaScript, no network
reference).

    html.py      HTML primitives: escaping, tables, embedded PNGs, the page and its CSS
    stats.py     printing mean ± 95% confidence interval (reporting.mean_ci: Student t, no scipy)
    sections.py  the page's parts: config, training curves, metric and ablation tables, figures
    cli.py       the command: arguments, checks before the work, loading, analysis, writing
"""
