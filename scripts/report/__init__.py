"""The report: report.py reads every result and writes report.md; answer.py writes its first section (the Answer);
summary.py pools the summary's numbers; sections.py holds one function per section; plots.py draws the figures."""
