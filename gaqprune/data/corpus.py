"""The embedded offline corpus: ~100 English Wikipedia articles from gensim's test data.

Source: ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
in the gensim wheel (4.3.3 / 4.4.0). Wikipedia text is CC BY-SA 3.0, (c) Wikipedia contributors.
Install the wheel without its dependencies: ``pip install --no-deps gensim==4.4.0``; the file is
found through the wheel's metadata, gensim itself is never imported.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.metadata
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from gaqprune.errors import GaqpruneError

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
# Every EVAL_EVERY-th article (in file order) is evaluation text; the rest calibrates and trains.
EVAL_EVERY = 10
MIN_ARTICLE_CHARS = 500


def wiki_dump_path() -> Path:
    """Locate the Wikipedia dump inside the installed gensim wheel and check its hash."""
    try:
        files = importlib.metadata.files("gensim") or []
    except importlib.metadata.PackageNotFoundError:
        raise GaqpruneError(
            "the embedded corpus needs the gensim wheel: pip install --no-deps gensim==4.4.0"
        ) from None
    for f in files:
        if str(f).endswith(WIKI_FILE):
            path = Path(f.locate())
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest != WIKI_SHA256:
                raise GaqpruneError(f"{path} has sha256 {digest}, expected {WIKI_SHA256}; reinstall gensim==4.4.0")
            return path
    raise GaqpruneError(f"the gensim wheel has no {WIKI_FILE}; reinstall gensim==4.4.0 (--no-deps)")


def _clean(wikitext: str) -> str:
    import mwparserfromhell

    code = mwparserfromhell.parse(wikitext)
    for table in code.filter_tags(recursive=False, matches=lambda node: node.tag == "table"):
        try:
            code.remove(table)
        except ValueError:
            pass
    text = code.strip_code(normalize=True, collapse=True)
    # Back matter (references, link lists) is not prose: cut the article there.
    text = re.split(r"\n(?:See also|References|External links|Further reading|Notes|Bibliography|Sources)\s*\n", text)[0]
    lines = []
    for line in text.splitlines():
        line = line.strip()
        # Leftovers of image captions and tables ("thumb|...", "right|...") are not prose.
        if not line or re.match(r"^(thumb|right|left|upright|frame)\b.*\|", line) or line.startswith("|"):
            continue
        lines.append(line)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def parse_articles(path: Path) -> list[dict]:
    """Cleaned main-namespace, non-redirect articles as ``{"title", "text"}`` in file order."""
    articles = []
    with bz2.open(path) as f:
        for _, el in ET.iterparse(f):
            if not el.tag.endswith("}page"):
                continue
            ns = el.find("{*}ns")
            text_el = el.find("{*}revision/{*}text")
            if ns is not None and ns.text == "0" and el.find("{*}redirect") is None and text_el is not None:
                text = _clean(text_el.text or "")
                if len(text) >= MIN_ARTICLE_CHARS:
                    articles.append({"title": el.find("{*}title").text, "text": text})
            el.clear()
    return articles


def embedded_articles(cache_dir: Path) -> dict[str, list[str]]:
    """The embedded corpus split by article: ``{"train": [...], "eval": [...]}``, cached as JSON."""
    from gaqprune.atomic import write_json

    cache = cache_dir / "corpus" / f"enwiki-{WIKI_SHA256[:12]}.json"
    if cache.is_file():
        articles = json.loads(cache.read_text())
    else:
        articles = parse_articles(wiki_dump_path())
        write_json(cache, articles)
    return {
        "train": [a["text"] for i, a in enumerate(articles) if i % EVAL_EVERY != EVAL_EVERY - 1],
        "eval": [a["text"] for i, a in enumerate(articles) if i % EVAL_EVERY == EVAL_EVERY - 1],
    }
