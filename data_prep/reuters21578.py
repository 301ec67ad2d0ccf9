"""Reuters-21578 (ModApte split): Reuters news stories labelled with TOPICS categories.

Free for research use only, so xmlgame neither ships nor downloads it: bring the files with
``--from`` (AttentionXML layout: one text per line, labels space-separated).
"""

from xmlgame.recipes import DATA_README, Recipe

RECIPE = Recipe(
    name="reuters21578",
    aliases=("reuters", "reuters-21578"),
    description="Reuters news story -> TOPICS categories",
    layout="attentionxml",
    files=("train_texts.txt", "train_labels.txt", "test_texts.txt", "test_labels.txt"),
    page="https://archive.ics.uci.edu/dataset/137/reuters+21578+text+categorization+collection",
    origin=f"the Reuters-21578 collection, ModApte split, research use only; see {DATA_README}",
    train_docs=7_728,
    test_docs=3_005,
    labels=117,
)
