"""Analysis: topology of segmentations (Betti numbers); CMIF and the audit come later."""
