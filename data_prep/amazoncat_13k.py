"""AmazonCat-13K: Amazon product texts labelled with their product categories."""

from xmlgame.recipes import PECOS_FILES, PECOS_PAGE, PECOS_URL, Recipe

RECIPE = Recipe(
    name="amazoncat-13k",
    aliases=("amazoncat",),
    description="Amazon product text -> product categories",
    layout="pecos",
    urls=(PECOS_URL.format("amazoncat-13k"),),
    files=PECOS_FILES,
    page=PECOS_PAGE,
    train_docs=1_186_239,
    test_docs=306_782,
    labels=13_330,
)
