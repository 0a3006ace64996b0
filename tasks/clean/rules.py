"""The cleaning rules, one document at a time: Unicode normalization, boilerplate lines, PII
scrubbing, quality heuristics, splitting long documents. Pure functions of (text, category, config)."""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata

import numpy as np

from tasks.clean.dedup import code_points
from tasks.core.config import CleanConfig

# the boilerplate share/doc thresholds are clean.boilerplate_* config fields
BOILERPLATE_MIN_LINE_CHARS = 12  # shorter lines ("Ingredients", "}") are structure, not boilerplate


# Quality profiles: code is exempt from the alpha/symbol rules, structured categories count letters
# without digits, every other category is prose.
STRUCTURED = frozenset({"product_compositions", "chemical_additives"})


CODE = frozenset({"code"})


# ------------------------------------------------------------------------------ text cleanup
_ZERO_WIDTH_CHARS = "\u200b\u200c\u200d\u2060\ufeff\u00ad"


_ZERO_WIDTH = dict.fromkeys(map(ord, _ZERO_WIDTH_CHARS), None)


_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


_CONTROL_BYTES = bytes([*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])


_SPACES_RE = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")


# whitespace other than space, tab and newline: where it occurs, lines take the general per-line path
_ODD_SPACE_RE = re.compile(r"[^\S \t\n]")


_TRAILING_RE = re.compile(r"[ \t]+\n")


_MULTI_SPACE_RE = re.compile(r"  +")


_BLANKS_RE = re.compile(r"\n{3,}")


_CODE_LIKE_RE = re.compile(
    r"[(){}\[\];=<>]|^\s*(import|from|def|class|return|#include|package|using|const|let|var|function|public|private)\b"
)


def _has_control(text: str) -> bool:
    b = text.encode("utf-8", "surrogatepass")
    if len(b.translate(None, _CONTROL_BYTES)) != len(b):
        return True
    # C1 controls (U+0080..U+009F) are 0xC2 0x80..0x9F in UTF-8; 0xC2 alone also starts common
    # characters (nbsp, degree sign), so only then is the regex asked
    return b"\xc2" in b and _CONTROL_RE.search(text) is not None


def normalize_text(text: str, form: str, code: bool = False) -> str:
    """Unicode form, unified newlines, no zero-width/control characters, no trailing spaces.

    Each step first checks (with C-speed string methods) whether it has anything to do: most
    documents need none of them, and the per-line regex pass was the stage's largest cost."""
    if not text.isascii():  # ASCII is already in every normal form and has no zero-width characters
        text = unicodedata.normalize(form, text)
        if any(ch in text for ch in _ZERO_WIDTH_CHARS):
            text = text.translate(_ZERO_WIDTH)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if _has_control(text):
        text = _CONTROL_RE.sub("", text)
    if not text.isascii() and _ODD_SPACE_RE.search(text):
        return _normalize_lines(text, code)
    # from here the only whitespace is space, tab and newline
    if code:  # indentation is syntax in code: only trailing whitespace goes
        if " \n" in text or "\t\n" in text:
            text = _TRAILING_RE.sub("\n", text)
        return text.rstrip(" \t")
    # runs of spaces and tabs become one space (a tab becomes a space first: same runs, same result)
    if "\t" in text:
        text = text.replace("\t", " ")
    if "  " in text:
        text = _MULTI_SPACE_RE.sub(" ", text)
    # single spaces only: strip each line's one leading/trailing space
    if " \n" in text:
        text = text.replace(" \n", "\n")
    if "\n " in text:
        text = text.replace("\n ", "\n")
    return text.strip(" ")


def _normalize_lines(text: str, code: bool) -> str:
    """The general path: every line on its own."""
    if code:
        lines = [ln.rstrip() for ln in text.split("\n")]
    else:
        lines = [_SPACES_RE.sub(" ", ln).strip() for ln in text.split("\n")]
    return "\n".join(lines)


def collapse_blank_lines(text: str) -> str:
    if "\n\n\n" in text:
        text = _BLANKS_RE.sub("\n\n", text)
    return text.strip("\n").rstrip()


def _canonical_line(line: str) -> str:
    return " ".join(line.split())


def _line_key(line: str) -> bytes:
    return hashlib.blake2b(_canonical_line(line).encode(), digest_size=8).digest()


def _boilerplate_candidate(line: str, code: bool) -> str | None:
    """The line's whitespace-collapsed form if it could be boilerplate, else None."""
    words = line.split()
    if len(words) < 3:
        return None
    s = line.strip()
    # in code, repeated lines such as imports are content; only prose-looking lines can be footers
    if len(s) < BOILERPLATE_MIN_LINE_CHARS or (code and _CODE_LIKE_RE.search(s)):
        return None
    return " ".join(words)


@functools.lru_cache(maxsize=1024)
def _first_words(lines: frozenset[str]) -> tuple[str, ...]:
    return tuple({ln.split(" ", 1)[0] for ln in lines})


def remove_boilerplate(text: str, lines: frozenset[str], code: bool) -> tuple[str, int]:
    """Drop the lines whose whitespace-collapsed form is one of the source's boilerplate lines (a
    line not starting with one of their first words cannot be one: checked first, at C speed)."""
    if not lines:
        return text, 0
    first = _first_words(lines)
    kept, removed = [], 0
    for ln in text.split("\n"):
        if ln.lstrip().startswith(first) and _boilerplate_candidate(ln, code) in lines:
            removed += 1
        else:
            kept.append(ln)
    return "\n".join(kept), removed


# ---------------------------------------------------------------------------------------- PII
EMAIL = "[EMAIL]"


PHONE = "[PHONE]"


_EMAIL_RE = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")


_PHONE_RE = re.compile(r"(?<![\w+/.-])(\+\d{1,3}[ .-]?)?(\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){1,5}(?![\w/-]|[.,]\d)")


_DATE_RE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{4}")


_NANP_RE = re.compile(r"\d{3}[ .-]\d{3}[ .-]\d{4}")


def _phone_or_not(m: re.Match[str]) -> str:
    """Decide whether a run of digit groups is a phone number; quantities, dates and versions stay."""
    s = m.group(0)
    digits = sum(c.isdigit() for c in s)
    if not 7 <= digits <= 15 or _DATE_RE.fullmatch(s):
        return s
    groups = re.split(r"[ .-]+", s)
    seps = set(re.findall(r"[ .-]", s))
    if s.startswith("+") or m.group(2) or _NANP_RE.fullmatch(s):
        return PHONE
    if len(groups) >= 3 and len(seps) == 1 and (seps <= {"-", "."} or s.startswith("0")):
        return PHONE  # 0xx xxx xxxx (national trunk prefix) or dash/dot-grouped numbers
    return s


# A phone match starts with "+", "(" or a digit and consumes only digits and " ().+-", so it lies inside
# a match of this (greedy) run pattern; a run with fewer than 7 digits never holds a phone number.
_PHONE_RUN_RE = re.compile(r"[\d(+][\d ().+-]{6,}")


def _phone_windows(text: str) -> list[tuple[int, int]]:
    """Slices of ``text`` outside which ``_PHONE_RE.sub(_phone_or_not, ...)`` changes nothing: runs
    holding >= 7 digits, with one character of context before (the look-behind; it cannot start a
    match) and two after (the look-ahead)."""
    windows: list[tuple[int, int]] = []
    for m in _PHONE_RUN_RE.finditer(text):
        if sum(ch.isdigit() for ch in m.group()) < 7:
            continue
        a, b = max(m.start() - 1, 0), min(m.end() + 2, len(text))
        if windows and a <= windows[-1][1]:
            windows[-1] = (windows[-1][0], b)
        else:
            windows.append((a, b))
    return windows


def scrub_pii(text: str, phones: bool = True) -> tuple[str, int, int]:
    """Replace e-mail addresses and phone numbers with placeholders; returns (text, n_emails, n_phones)."""
    n_email = 0
    if "@" in text:  # every e-mail match has one
        text, n_email = _EMAIL_RE.subn(EMAIL, text)
    n_phone = 0
    if phones:
        windows = _phone_windows(text)
        if windows:
            parts, pos = [], 0
            for a, b in windows:
                parts += [text[pos:a], _PHONE_RE.sub(_phone_or_not, text[a:b])]
                pos = b
            parts.append(text[pos:])
            out = "".join(parts)
        else:
            out = text
        if out is not text:
            n_phone = out.count(PHONE) - text.count(PHONE)
            text = out
    return text, n_email, n_phone


# ---------------------------------------------------------------------------------- heuristics
_LETTER_RE = re.compile(r"[^\W\d_]")


_DIGIT_RE = re.compile(r"\d")


_SPACE_RE = re.compile(r"\s")


_SYMBOL_CHARS = frozenset("#*@&{}\\_|~^`<>=$")


def _is_symbol(ch: str) -> bool:
    return ch in _SYMBOL_CHARS or unicodedata.category(ch)[0] == "S"


@functools.lru_cache(maxsize=8192)
def _char_classes(code: int) -> tuple[int, int, int, int]:
    """(letter, digit, space, symbol) flags of one character, by the same rules as the regexes."""
    ch = chr(code)
    symbol = not ch.isalnum() and not ch.isspace() and _is_symbol(ch)
    return (int(bool(_LETTER_RE.match(ch))), int(bool(_DIGIT_RE.match(ch))), int(bool(_SPACE_RE.match(ch))), int(symbol))


_ASCII_CLASSES = np.array([_char_classes(i) for i in range(128)], dtype=np.int64).T  # 4 x 128


def char_counts(text: str) -> tuple[int, int, int, int]:
    """Numbers of letters, digits, whitespace and symbol characters: a histogram of the ASCII code
    points, and the distinct non-ASCII characters classified one by one."""
    cp = code_points(text)
    hist = np.bincount(np.minimum(cp, 128), minlength=129)
    counts = _ASCII_CLASSES @ hist[:128]
    if hist[128]:
        codes, n = np.unique(cp[cp > 127], return_counts=True)
        counts = counts + np.array([_char_classes(x) for x in codes.tolist()], dtype=np.int64).T @ n
    return tuple(int(x) for x in counts)  # type: ignore[return-value]


def quality_reject(text: str, category: str, c: CleanConfig) -> tuple[str, str] | None:
    """(reason, detail) if the cleaned text fails the heuristics for its category, else None."""
    if not text.strip():
        return "empty", "no text left after cleaning"
    if len(text) < c.min_chars:
        return "too_short", f"{len(text)} chars < min_chars={c.min_chars}"
    if category in CODE:
        return None
    letters, digits, spaces, symbols = char_counts(text)
    non_space = len(text) - spaces
    denom = non_space - (digits if category in STRUCTURED else 0)
    alpha = letters / max(denom, 1)
    if alpha < c.min_alpha_ratio:
        return "low_alpha", f"alpha ratio {alpha:.3f} < {c.min_alpha_ratio}"
    ratio = symbols / max(non_space, 1)
    if ratio > c.max_symbol_ratio:
        return "symbol_ratio", f"symbol ratio {ratio:.3f} > {c.max_symbol_ratio}"
    return None


# --------------------------------------------------------------------------- long documents
_SEPARATORS = ("\n\n", "\n", " ")


def split_parts(text: str, max_chars: int, level: int = 0) -> list[str]:
    """Split at paragraph boundaries into parts of <= max_chars; a paragraph that is itself too long
    falls back to line, then word boundaries, then a hard cut. Nothing is lost but separators."""
    if len(text) <= max_chars:
        return [text]
    if level == len(_SEPARATORS):
        return [text[i : i + max_chars] for i in range(0, len(text), max_chars)]
    sep = _SEPARATORS[level]
    parts: list[str] = []
    cur = ""
    for unit in text.split(sep):
        if len(unit) > max_chars:
            if cur:
                parts.append(cur)
                cur = ""
            parts.extend(split_parts(unit, max_chars, level + 1))
        elif cur and len(cur) + len(sep) + len(unit) > max_chars:
            parts.append(cur)
            cur = unit
        else:
            cur = f"{cur}{sep}{unit}" if cur else unit
    if cur:
        parts.append(cur)
    return [p for p in parts if p.strip()]


# ------------------------------------------------------------------------------------ dedup
def exact_key(text: str) -> bytes:
    return hashlib.sha256(" ".join(text.split()).encode()).digest()[:16]


def clean_text(text: str, category: str, boilerplate: frozenset[str], c: CleanConfig) -> tuple[str, dict[str, int]]:
    """One document through normalization, boilerplate removal and PII scrubbing."""
    code = category in CODE
    t = normalize_text(text, c.unicode_form, code)
    t, n_boiler = remove_boilerplate(t, boilerplate, code)
    t = collapse_blank_lines(t)
    n_email = n_phone = 0
    if c.scrub_pii:
        t, n_email, n_phone = scrub_pii(t, phones=not code)
    return t, {"boilerplate_lines": n_boiler, "emails_scrubbed": n_email, "phones_scrubbed": n_phone}
