"""bibtex: BibSonomy entries (1,836 binary word features) -> the tags users gave them.

The Mulan benchmark set, re-split 80/20 for xmlgame, in the XC repository's BoW layout.
"""

from xmlgame.recipes import DATA_README, Recipe

RECIPE = Recipe(
    name="bibtex",
    description="BibSonomy entry (1,836 word indicators) -> user tags",
    layout="xc-bow",
    files=("train.txt", "test.txt"),
    origin=f"the Mulan multi-label benchmark 'bibtex', re-split 80/20; see {DATA_README}",
    train_docs=5_907,
    test_docs=1_488,
    labels=159,
)
