"""Materials science on the library's layers: offline data, composition transformers,
cross-validated evaluation against a scikit-learn baseline, and screening.

Needs the ``science`` extra (pymatgen-core for element properties and formula parsing,
scikit-learn for the baseline, tqdm for progress bars): ``pip install -e '.[science]'``.
"""
