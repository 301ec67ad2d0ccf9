"""Wiki10-31K: Wikipedia articles labelled with the social bookmarking tags users gave them."""

from xmlgame.recipes import PECOS_FILES, PECOS_PAGE, PECOS_URL, Recipe

RECIPE = Recipe(
    name="wiki10-31k",
    aliases=("wiki10",),
    description="Wikipedia article -> social bookmarking tags",
    layout="pecos",
    urls=(PECOS_URL.format("wiki10-31k"),),
    files=PECOS_FILES,
    page=PECOS_PAGE,
    train_docs=14_146,
    test_docs=6_616,
    labels=30_938,
)
