"""The command-line helpers shared by every entry script (cli.py), the results-file sections of the benchmarks (report.py), and the dataset generator."""
