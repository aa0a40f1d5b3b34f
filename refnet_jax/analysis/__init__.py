"""Analysis of finished runs: latent-graph metrics and probes (`graph`), their pictures (`plots`, which needs
matplotlib, the `analysis` extra, and is imported only by what draws), and the results tables and machine
records of experiments and benchmarks (`report`).
"""
