"""LF-AmazonTitles-131K: Amazon product titles -> related products, with label (product) titles.

The Extreme Classification Repository distributes it through a Google Drive link, which a plain
HTTP client cannot fetch, so this recipe has no URL: download it by hand and use ``--from``.
"""

from xmlgame.recipes import XC_REPOSITORY, Recipe

RECIPE = Recipe(
    name="lf-amazontitles-131k",
    aliases=("amazontitles-131k", "lf-amazontitles"),
    description="Amazon product title -> related products (label features: product titles)",
    layout="lf",
    files=("trn_X.txt", "tst_X.txt", "Y.txt", "trn_X_Y.txt", "tst_X_Y.txt"),
    page=f"{XC_REPOSITORY} (Google Drive link; no direct URL)",
    origin="the Extreme Classification Repository",
    train_docs=294_805,
    test_docs=134_835,
    labels=131_073,
)
