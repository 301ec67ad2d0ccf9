"""delicious: web pages (500 binary word features) -> the Delicious tags users gave them.

The Mulan benchmark set, re-split 80/20 for xmlgame, in the XC repository's BoW layout.
"""

from xmlgame.recipes import DATA_README, Recipe

RECIPE = Recipe(
    name="delicious",
    description="web page (500 word indicators) -> Delicious tags",
    layout="xc-bow",
    files=("train.txt", "test.txt"),
    origin=f"the Mulan multi-label benchmark 'delicious', re-split 80/20; see {DATA_README}",
    train_docs=12_882,
    test_docs=3_209,
    labels=983,
)
