"""Analysis: cross-modal information flow (cmif), the empirical audit of the paper, and topology (Betti numbers)."""
