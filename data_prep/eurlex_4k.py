"""EURLex-4K: EU legal documents (EUR-Lex) labelled with EuroVoc descriptors."""

from xmlgame.recipes import PECOS_FILES, PECOS_PAGE, PECOS_URL, Recipe

RECIPE = Recipe(
    name="eurlex-4k",
    aliases=("eurlex", "eurlex4k"),
    description="EU legal document -> EuroVoc descriptors",
    layout="pecos",
    urls=(PECOS_URL.format("eurlex-4k"),),
    files=PECOS_FILES,
    page=PECOS_PAGE,
    train_docs=15_449,
    test_docs=3_865,
    labels=3_956,
)
