"""PaDiM (Defard et al., ICPR 2020)."""
