"""gutenberg-lcsh: Project Gutenberg book titles -> Library of Congress subject headings.

Subject data from the ``gutenbergr`` R package (GPL-2), split 80/20 by author. Titles only, like
the LF-*Titles benchmarks; about a quarter of test assignments are labels unseen in training.
"""

from xmlgame.recipes import DATA_README, Recipe

RECIPE = Recipe(
    name="gutenberg-lcsh",
    aliases=("gutenberg",),
    description="Project Gutenberg book title -> Library of Congress subject headings",
    layout="jsonl",
    files=("train.jsonl", "test.jsonl", "label_texts.jsonl"),
    origin=f"the gutenbergr R package metadata (GPL-2), split 80/20 by author; see {DATA_README}",
    train_docs=49_522,
    test_docs=15_734,
    labels=36_650,
)
