"""English function words, left out of the tag vocabulary so that tags name things, actions and
attributes (``dog``, ``running``, ``red``), not grammar.

The project's own list (no download): articles, pronouns, prepositions, conjunctions, auxiliary
and modal verbs, and the commonest adverbs and quantifiers, lowercase, as the tokeniser emits
them: the tokeniser splits at apostrophes, so contractions appear as their pieces (``s``, ``t``,
``re``, ``isn``) and are listed as such.
"""

from __future__ import annotations

STOPWORDS: frozenset[str] = frozenset(
    """
    a an the
    i me my mine myself we us our ours ourselves you your yours yourself yourselves
    he him his himself she her hers herself it its itself they them their theirs themselves
    this that these those who whom whose which what whatever whoever
    am is are was were be been being have has had having do does did doing done
    will would shall should can could may might must ought
    and or but nor so yet if then else than because while whereas although though unless
    as until till since whether either neither both
    of at by for with about against between into through during before after above below
    to from up down in out on off over under again further once upon onto within without
    along across around among amongst behind beside besides beyond near toward towards via
    per inside outside throughout underneath
    here there when where why how all any each every few more most other some such no not
    only own same too very just also even still ever never
    s t d ll m o re ve y ain isn aren wasn weren hasn haven hadn doesn don didn won wouldn
    shan shouldn cannot couldn mustn mightn needn
    """.split()
)


def is_content_word(token: str) -> bool:
    """True for a token that can be a tag: not a stop word, at least two characters, some letter."""
    return len(token) > 1 and token not in STOPWORDS and any(ch.isalpha() for ch in token)
