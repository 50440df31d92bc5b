"""The dense CRF: its settings and backend choice (params), the torch implementation (densecrf) and the refinement of label maps and class probabilities by either backend (refine)."""
