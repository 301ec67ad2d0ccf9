"""Wiki-500K: Wikipedia articles labelled with their Wikipedia categories.

Propensity constants A = 0.5, B = 0.4, as for the other Wikipedia sets (Jain et al., 2016).
"""

from xmlgame.recipes import PECOS_FILES, PECOS_PAGE, PECOS_URL, Recipe

RECIPE = Recipe(
    name="wiki-500k",
    aliases=("wikipedia-500k", "wiki500k"),
    description="Wikipedia article -> Wikipedia categories",
    layout="pecos",
    urls=(PECOS_URL.format("wiki-500k"),),
    files=PECOS_FILES,
    page=PECOS_PAGE,
    train_docs=1_779_881,
    test_docs=769_421,
    labels=501_070,
    propensity_a=0.5,
    propensity_b=0.4,
)
