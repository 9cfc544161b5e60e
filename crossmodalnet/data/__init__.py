"""Data: the label table, NIfTI I/O, the synthetic phantom, datasets and MM-WHS preparation."""
