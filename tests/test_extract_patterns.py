"""One small hand-written page per failure pattern found on real pages (see benchmarks/bench_extract.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from scrapers.extract_page import extract_page
from tasks.core.config import REPO_ROOT

PAGES = Path(__file__).parent / "pages" / "extract"
ENTITY = re.compile(r"&(?:#\d{1,7}|#x[0-9a-f]{1,6}|[a-z][a-z0-9]{1,31});", re.IGNORECASE)
MARKUP = re.compile(r"</?[a-z][a-z0-9]*(?:\s[^<>]*)?/?>", re.IGNORECASE)
BOILERPLATE = re.compile(r"(?i)cookie|newsletter|share on|leave a reply|email address will not|nutzung eines buttons")


def extract(name: str, category: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    row = {"url": f"http://example.org/{name}", "category": category, "source_id": "t", "sha256": "x",
           "body": (PAGES / name).read_bytes(), "content_type": "text/html; charset=utf-8"}
    return extract_page(row, 1)


def doc(name: str, category: str) -> tuple[dict[str, Any], dict[str, Any]]:
    d, rej = extract(name, category)
    assert d is not None, rej
    return d, json.loads(d["fields"])


def strings(v: Any) -> list[str]:
    if isinstance(v, dict):
        return [s for x in v.values() for s in strings(x)]
    if isinstance(v, list):
        return [s for x in v for s in strings(x)]
    return [v] if isinstance(v, str) else []


CASES = [("entities.html", "recipes"), ("no_markup.html", "recipes"), ("text_only.html", "recipes"),
         ("graph_howtosection.html", "recipes"), ("microdata_groups.html", "recipes"), ("thin_markup.html", "recipes"),
         ("consent_article.html", "articles"), ("product_microdata.html", "product_compositions"),
         ("product_microdata.html", "product_descriptions"), ("product_rdfa.html", "product_compositions"),
         ("additive_text.html", "chemical_additives"), ("split_amount_name.html", "recipes"),
         ("repeated_blocks.html", "recipes"), ("dl_ingredients.html", "recipes"), ("span_marked.html", "recipes"),
         ("quantified_markup.html", "recipes"), ("cta_paragraph.html", "recipes"),
         ("self_closing_script.html", "recipes"), ("product_opengraph.html", "product_descriptions"),
         ("product_aggregate_offer.html", "product_descriptions"), ("servings_toggle.html", "recipes")]


@pytest.mark.parametrize(("name", "category"), CASES)
def test_no_entity_markup_or_boilerplate_in_any_record(name: str, category: str) -> None:
    d, fields = doc(name, category)
    for s in [d["title"], d["text"], *strings(fields)]:
        assert not ENTITY.search(s), (name, s)
        assert not MARKUP.search(s), (name, s)
        assert not BOILERPLATE.search(s), (name, s)


def test_entities_and_double_escaping_decoded_once_each() -> None:
    d, f = doc("entities.html", "recipes")
    assert f["title"] == "Cheesy Ground Beef & Cauliflower Casserole" and d["title"] == f["title"]
    assert f["ingredients"] == ["1 lb ground beef", "2 cups cauliflower & broccoli", "1 cup cheddar's best"]
    assert f["description"] == "Mom's favourite weeknight dish – Bœuf style."
    assert f["steps"] == ["Brown the beef & drain.", "Bake at 350°F."]
    assert '"always" on Fridays' in d["text"]


def test_page_without_markup_keeps_its_text_and_lists() -> None:
    d, f = doc("no_markup.html", "recipes")
    assert f["source_format"] == "html" and f["structured"] is True
    assert f["ingredients"] == ["250 g red lentils", "1 onion, chopped", "2 carrots, diced"]
    assert f["steps"][0] == "Fry the onion until soft."
    assert "kept our family warm" in d["text"] and "crusty bread" in d["text"]
    d, f = doc("text_only.html", "recipes")
    assert f["source_format"] == "text" and f["structured"] is False
    assert f["title"] == "Sunday bread" and "baked a loaf" in d["text"] and "crust crackled" in d["text"]


def test_graph_nested_recipe_howtosection_and_string_ingredients() -> None:
    d, f = doc("graph_howtosection.html", "recipes")  # a broken second JSON-LD block hides nothing
    assert f["title"] == "Lemon Layer Cake" and f["ingredients"] == ["200 g flour", "200 g sugar", "4 eggs"]
    assert f["steps"] == ["For the sponge:", "Beat eggs and sugar.", "Fold in the flour.", "For the icing:",
                          "Mix lemon juice and icing sugar."]
    assert "A bright cake for spring birthdays." in d["text"]


def test_microdata_only_with_ingredient_groups() -> None:
    _d, f = doc("microdata_groups.html", "recipes")
    assert f["source_format"] == "schema.org" and f["title"] == "Pad Thai"
    assert f["ingredients"] == ["3 tbsp fish sauce", "2 tbsp tamarind paste", "200 g rice noodles", "2 eggs"]
    assert len(f["steps"]) == 2


def test_page_list_with_quantities_beats_thin_markup() -> None:
    _, f = doc("thin_markup.html", "recipes")
    assert f["ingredients"] == ["300 g chicken breast", "80 ml soy sauce", "1 tsp brown sugar"]


def test_amount_and_name_in_separate_elements_stay_one_line() -> None:
    _, f = doc("split_amount_name.html", "recipes")  # and an ingredient link inside a step is not a line
    assert f["ingredients"] == ["2 cups hot water", "1 tablespoon tomato paste", "1½ cups tomato puree"]


def test_repeated_blocks_without_list_items() -> None:
    _, f = doc("repeated_blocks.html", "recipes")
    assert f["ingredients"] == ["4 αυγά μεγάλα", "2 ντομάτες ώριμες", "1/2 φλ. ελαιόλαδο"]


def test_definition_list_of_ingredients() -> None:
    _, f = doc("dl_ingredients.html", "recipes")
    assert f["ingredients"] == ["flax seeds 60 g", "water 120 ml", "sea salt 2 g"]
    assert f["steps"][0] == "Soak the seeds in the water for 20 minutes."


def test_list_items_holding_a_marked_span() -> None:
    d, f = doc("span_marked.html", "recipes")
    assert f["ingredients"] == ["300 gr rundergehakt", "1 ui", "2 paprika's bijv. een rode en een gele"]
    assert "bak het gehakt rul" in d["text"]


def test_servings_toggles_and_the_section_heading_are_not_ingredient_lines() -> None:
    """A recipe card without markup: its "Ingredients 1x 2x 3x" heading and unit switch are furniture; the
    group names stay (they say which part of the dish a line belongs to); the card's amount / unit / name
    spans, which the main-text extractor puts on lines of their own, are not repeated as prose."""
    d, f = doc("servings_toggle.html", "recipes")
    assert f["ingredients"] == ["Dry", "2 ¼ cups oat flour", "1 tsp baking powder", "Wet", "120 ml buttermilk"]
    assert f["steps"][0] == "Mix the dry ingredients."
    assert d["text"].split("\n\n")[-1] == "Crumbly oat scones for a slow breakfast."
    assert not {"1x", "2x", "3x", "cups", "Metric"} & set(d["text"].split("\n"))


def test_markup_with_quantities_is_kept_as_written() -> None:
    _, f = doc("quantified_markup.html", "recipes")
    assert f["ingredients"] == ["1 1/2 cups dry red lentils", "1 large carrot (finely diced)", "3 cups vegetable broth"]


def test_consent_share_newsletter_comment_form_removed_from_articles() -> None:
    d, _ = doc("consent_article.html", "articles")
    assert "short-chain fatty acids" in d["text"] and "Beans, lentils, oats" in d["text"]
    for junk in ("cookie", "Facebook", "newsletter", "Anbieter", "Leave a Reply", "Required fields"):
        assert junk.lower() not in d["text"].lower(), junk


def test_call_to_comment_dropped_from_a_long_paragraph_but_prose_about_sharing_kept() -> None:
    d, _ = doc("cta_paragraph.html", "recipes")
    assert "I wanted to share this recipe today" in d["text"]
    assert "Serve it beside grilled fish" in d["text"] and "almost no cooking at all on hot evenings." in d["text"]
    assert "leave a comment" not in d["text"] and "give this recipe a rating" not in d["text"]


def test_self_closing_script_is_not_page_text() -> None:
    d, _ = doc("self_closing_script.html", "recipes")
    assert "Walnuts or chocolate chips" in d["text"] and "freezes well" in d["text"]
    assert "configuration" not in d["text"] and "function()" not in d["text"]


def test_products_from_microdata_and_rdfa() -> None:
    _d, f = doc("product_microdata.html", "product_compositions")
    assert f["has_schema"] and f["name"] == "Oat Crunch & Honey" and f["brand"] == "Crunch Co"
    assert f["ingredients"].startswith("oats (60%), honey, almonds & sunflower oil")
    assert f["nutrition"]["Fat"] == "18 g"
    _, f = doc("product_rdfa.html", "product_compositions")
    assert f["has_schema"] and f["name"] == "Rye Crackers" and f["brand"] == "Nordic"


def test_product_facts_from_open_graph_product_tags() -> None:
    d, f = doc("product_opengraph.html", "product_descriptions")
    assert f["open_graph"] and not f["has_schema"] and f["name"] == "Smoked paprika 75 g"
    assert f["brand"] == "La Dehesa" and f["price"] == "4.20 EUR" and f["gtin"] == "8412345678905"
    assert f["description"] == "Oak-smoked sweet paprika from Extremadura, stone-ground." and "smoky warmth" in d["text"]


def test_product_aggregate_offer_price_range_and_gtin12() -> None:
    _, f = doc("product_aggregate_offer.html", "product_descriptions")
    assert f["price"] == "9.50-24.00 EUR" and f["gtin"] == "012345678905" and f["brand"] == "Olivar"


def test_additive_from_text_lines() -> None:
    _d, f = doc("additive_text.html", "chemical_additives")
    assert f["e_number"] == "E330" and f["function"] == "Acidity regulator & antioxidant"


def test_navigation_page_still_rejected() -> None:
    page = "<html><body><main><ul>" + "".join(f'<li><a href="r{i}.html">Recipe {i}</a></li>' for i in range(30))
    row = {"url": "http://example.org/recipes/", "category": "recipes", "source_id": "t", "sha256": "x",
           "body": (page + "</ul></main></body></html>").encode(), "content_type": "text/html"}
    d, rej = extract_page(row, 1)
    assert d is None and rej["reason"] == "navigation_page"


# one line per phrase of scrapers.common._BOILERPLATE: each is dropped, so the fast pre-check
# (_BOILERPLATE_HINT) lets every one of them through to the full pattern
FURNITURE_LINES = [
    "We use cookies to give you the best experience.", "This website uses cookies.", "Cookie settings",
    "Accept all cookies", "Manage your privacy preferences", "By clicking OK you agree to our terms.",
    "Privacy policy and cookie notice", "Sign up for our free newsletter!", "Subscribe to my emails",
    "Join our newsletter", "Never miss a recipe", "Delivered straight to your inbox.", "Share on Pinterest",
    "Share it with us on Instagram", "Rate this recipe", "Leave a review", "Tag me on Instagram",
    "Pin it for later", "Save this recipe for later", "Click to share on Facebook", "Share via email",
    "Leave a Reply", "Your email address will not be published.", "Required fields are marked *",
    "Save my name, email, and website in this browser.", "Notify me of follow-up comments by email.",
    "You must be logged in to post a comment.", "This site uses Akismet to reduce spam.",
    "Log in to leave a comment", "If you enjoyed reading this, pass it on.",
    "Durch die Nutzung eines Buttons wirst du zum jeweiligen Anbieter weitergeleitet.",
    "Wir verwenden Cookies.", "Diese Webseite verwendet Cookies.", "Cookie-Einstellungen", "Datenschutzeinstellungen",
    "Zum Newsletter anmelden", "Newsletter abonnieren", "Melde dich jetzt zu unserem Newsletter an",
    "Um Kommentare zu schreiben, melden Sie sich an.", "Kommentar schreiben", "Sie sind aktuell nicht eingeloggt.",
    "Klicken Sie auf den unteren Button, um den Inhalt zu laden.", "Inhalt von Instagram laden",
    "Nous utilisons des cookies.", "Ce site utilise des cookies.", "Utilizamos cookies.",
    "Este sitio web utiliza cookies.", "Utilizziamo i cookie.", "Używamy plików cookies.",
    "Pour lire la suite, abonnez-vous.", "Abonnez-vous à notre newsletter", "Suscríbete a nuestro boletín",
    "Síguenos en Instagram", "Folge uns auf Instagram", "Follow us on Facebook", "Share this recipe",
]


@pytest.mark.parametrize("line", FURNITURE_LINES)
def test_every_furniture_phrase_is_dropped(line: str) -> None:
    from scrapers.common import drop_boilerplate

    assert drop_boilerplate(f"A real first paragraph stays.\n{line}\nAnd the last one too.") == \
        "A real first paragraph stays.\nAnd the last one too."


@pytest.mark.parametrize(("name", "category", "parse"), [
    ("product_microdata.html", "product_compositions", "parse_composition"),
    ("product_rdfa.html", "product_descriptions", "parse_description"),
    ("additive_text.html", "chemical_additives", "parse")])
def test_products_and_additives_read_the_one_lxml_tree(name: str, category: str, parse: str) -> None:
    """No second (BeautifulSoup) parse of the page for these categories."""
    import importlib

    from scrapers.common import make_page

    module = importlib.import_module("scrapers.additives" if category == "chemical_additives" else "scrapers.products")
    page = make_page(f"http://example.org/{name}", (PAGES / name).read_text(encoding="utf-8"))
    assert getattr(module, parse)(page).text and page._soup is None


def test_an_index_page_with_an_intro_is_navigation_not_an_article():
    """The demo site's article index (an intro, then links: 94 % linked list items, a directory index URL) is
    rejected as navigation, not kept as an article that then duplicates itself under two URLs."""
    from scrapers.articles import parse
    from scrapers.common import ParseReject, make_page

    html = (REPO_ROOT / "data" / "demo_site" / "articles" / "index.html").read_text(encoding="utf-8")
    with pytest.raises(ParseReject) as e:
        parse(make_page("http://127.0.0.1/articles/index.html", html))
    assert e.value.reason == "navigation_page"


def test_bench_strip_markup_leaves_only_the_text_fallback() -> None:
    """bench_extract --strip-markup: a page with JSON-LD and microdata, stripped, is read from its lists."""
    from benchmarks.bench_extract import strip_markup

    html = (PAGES / "microdata_groups.html").read_bytes()
    bare = strip_markup(html)
    assert b"itemprop" not in bare and b"itemscope" not in bare and b"application/ld+json" not in bare
    row = {"url": "http://example.org/x", "category": "recipes", "source_id": "t", "sha256": "x", "body": bare,
           "content_type": "text/html; charset=utf-8"}
    d, rej = extract_page(row, 1)
    assert d is not None, rej
    assert json.loads(d["fields"])["source_format"] in ("html", "text")
