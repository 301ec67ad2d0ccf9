"""debtags: Debian package descriptions labelled with their debtags (``role::program``, ...).

Ships with xmlgame (``xmlgame/bundled/debtags/``), so ``xmlgame prep debtags`` works offline.
"""

from xmlgame.recipes import Recipe

RECIPE = Recipe(
    name="debtags",
    description="Debian package description -> debtags",
    layout="jsonl",
    files=("train.jsonl", "test.jsonl"),
    bundled="debtags",
    origin="Debian's archive: package descriptions and their debtags (split by source package)",
    train_docs=24_294,
    test_docs=6_005,
    labels=598,
)
