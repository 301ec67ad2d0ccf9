"""Dataset recipes, one module per dataset; installed as ``xmlgame.data_prep``.

Each module defines ``RECIPE``, an :class:`xmlgame.recipes.Recipe` saying where the dataset's
files come from, their layout, and the counts a correct copy has. To add a dataset, add a module
and list it below; ``xmlgame prep --list`` shows them in this order.
"""

from xmlgame.data_prep import (
    amazon_3m,
    amazon_670k,
    amazoncat_13k,
    bibtex,
    debtags,
    delicious,
    eurlex_4k,
    gutenberg_lcsh,
    lf_amazontitles_131k,
    reuters21578,
    wiki10_31k,
    wiki_500k,
    wordnet_hypernyms,
)

_MODULES = (
    # standard benchmarks, downloaded (or by hand)
    eurlex_4k,
    wiki10_31k,
    amazoncat_13k,
    amazon_670k,
    wiki_500k,
    amazon_3m,
    lf_amazontitles_131k,
    # real long-tailed sets: bundled, or brought with --from
    debtags,
    reuters21578,
    wordnet_hypernyms,
    gutenberg_lcsh,
    bibtex,
    delicious,
)

RECIPES = tuple(module.RECIPE for module in _MODULES)

