"""Amazon-3M: Amazon product texts labelled with products bought or viewed together.

Propensity constants A = 0.6, B = 2.6, as for Amazon-670K (Jain et al., 2016).
"""

from xmlgame.recipes import PECOS_FILES, PECOS_PAGE, PECOS_URL, Recipe

RECIPE = Recipe(
    name="amazon-3m",
    aliases=("amazon3m",),
    description="Amazon product text -> products bought or viewed together",
    layout="pecos",
    urls=(PECOS_URL.format("amazon-3m"),),
    files=PECOS_FILES,
    page=PECOS_PAGE,
    train_docs=1_717_899,
    test_docs=742_507,
    labels=2_812_281,
    propensity_a=0.6,
    propensity_b=2.6,
)
