"""Commands built on the entry scripts: the protocol runner (pipeline.py, with its protocol files in
presets/ and its results table in rows.py), the demo (its small preset, over one or several seeds),
and the diagnostics (attention_diag.py, background_diag.py)."""
