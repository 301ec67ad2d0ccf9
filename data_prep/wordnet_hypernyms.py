"""wordnet-hypernyms: a WordNet word with its definition -> every broader term (hypernym).

Built from the WordNet database in Debian's archive (WordNet licence, permissive); split 80/20
by a hash so near-duplicates stay on one side. ``Y.ids.txt`` names each label uniquely.
"""

from xmlgame.recipes import DATA_README, Recipe

RECIPE = Recipe(
    name="wordnet-hypernyms",
    aliases=("wordnet",),
    description="WordNet word + definition -> every broader term",
    layout="lf",
    files=("trn_X.txt", "tst_X.txt", "Y.txt", "trn_X_Y.txt", "tst_X_Y.txt"),
    origin=f"WordNet as packaged in Debian's archive, split 80/20 by hash; see {DATA_README}",
    train_docs=76_261,
    test_docs=19_061,
    labels=20_472,
)
