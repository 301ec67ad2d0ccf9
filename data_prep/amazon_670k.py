"""Amazon-670K: Amazon product texts labelled with related products (item-to-item links).

The PECOS mirror names the archive ``amazon-670k``; xmlgame's canonical name is ``amazon670k``.
Its propensity constants are A = 0.6, B = 2.6 (Jain et al., 2016).
"""

from xmlgame.recipes import PECOS_FILES, PECOS_PAGE, PECOS_URL, Recipe

RECIPE = Recipe(
    name="amazon670k",
    aliases=("amazon-670k",),
    description="Amazon product text -> related products",
    layout="pecos",
    urls=(PECOS_URL.format("amazon-670k"),),
    files=PECOS_FILES,
    page=PECOS_PAGE,
    train_docs=490_449,
    test_docs=153_025,
    labels=670_091,
    propensity_a=0.6,
    propensity_b=2.6,
)
