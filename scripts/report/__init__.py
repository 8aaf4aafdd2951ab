"""The report: report.py reads every result and writes report.md; summary.py pools its first page; plots.py draws the figures."""
