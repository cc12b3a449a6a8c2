"""Reading rows: a run folder's files (store), the row's fields, analysis, the summary table, the
HTML report, plots, the papers' figures, comparisons of two runs, the status of a sweep. Nothing
here runs a cell or imports bench.run."""
