"""Analysis: topology of segmentations (Betti numbers); cross-modal information flow (cmif), the audit of the paper, topology."""
