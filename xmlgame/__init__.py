"""xmlgame: extreme multi-label text classification with CD-GTMLL.

A transformer or bag-of-words encoder feeds several sparse classifier heads ("players") over
shuffled, overlapping label shards; the players share an accuracy payoff and each earns a
curiosity reward for rare labels and for disagreeing with its peers.

Glossary, used for names and shape comments across the package:

    B  documents in a batch          T  tokens per document
    D  hidden size of the encoder    L  labels in the dataset
    N  players                       K  shortlist size (candidate labels per document)
    k  metric cut-off (P@k)          F  sparse input features

Label ids are integers in ``[0, L)``; label matrices are ``scipy.sparse.csr_matrix`` of shape
``(documents, L)`` with 1.0 for a relevant label.
"""

from __future__ import annotations

__version__ = "0.1.0"
