"""Commands built on the entry scripts: the protocol runner (pipeline.py, with its stage table in
stages.py, the plan of a run in plan.py, its protocol files in presets/ checked by the schema of
protocol_file.py, and its results table in results.py and rows.py), the demo (its small preset,
over one or several seeds), and the diagnostics (attention_diag.py, background_diag.py)."""
