"""Programs built on the method: the demo, the dataset generator, the miniature reproduction, diagnostics, and the command-line helpers shared by every entry script."""
