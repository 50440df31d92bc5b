"""The command-line layer: the flags several entry scripts share (cli.py) and the policies built on
flags: a run's inherited settings (run_settings.py), where the CRF runs (crf_placement.py), and the
evaluation's sweep and class-set flags (evaluation.py)."""
