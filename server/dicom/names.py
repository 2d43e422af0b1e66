"""Person name normalisation for case/accent-insensitive and fuzzy matching (PS3.4 C.2.2.2.1, C.2.2.2.4)."""

from __future__ import annotations

import re
import unicodedata

_SPLIT = re.compile(r"[\^\s=,.\-]+")


def fold(value: str) -> str:
    """Upper-case, accent-free form of a text: 'Müller^Jürgen' -> 'MUELLER^JUERGEN'-like folding.

    German umlauts fold to their two-letter form (Ä->AE, Ö->OE, Ü->UE, ß->SS) as German registries
    write them; every other combining mark is dropped.
    """
    value = value.upper().replace("Ä", "AE").replace("Ö", "OE").replace("Ü", "UE").replace("ß", "SS")
    value = value.replace("ẞ", "SS")
    decomposed = unicodedata.normalize("NFKD", value)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def normalize_pn(value: str) -> str:
    """The matching form of a person name: its alphabetic group, folded, trailing empty components cut."""
    alphabetic = value.split("=", 1)[0]
    return fold(alphabetic).rstrip("^ ")


def _koelner(word: str) -> str:
    """Koelner Phonetik code of one folded word (Postel 1969), zeros kept only at the start."""
    w = "".join(c for c in word if "A" <= c <= "Z")
    codes: list[str] = []
    for i, c in enumerate(w):
        prev = w[i - 1] if i else ""
        nxt = w[i + 1] if i + 1 < len(w) else ""
        if c in "AEIJOUY":
            code = "0"
        elif c == "H":
            code = "-"
        elif c == "B":
            code = "1"
        elif c == "P":
            code = "3" if nxt == "H" else "1"
        elif c in "DT":
            code = "8" if nxt in "CSZ" else "2"
        elif c in "FVW":
            code = "3"
        elif c in "GKQ":
            code = "4"
        elif c == "C":
            if i == 0:
                code = "4" if nxt in "AHKLOQRUX" else "8"
            elif prev in "SZ":
                code = "8"
            else:
                code = "4" if nxt in "AHKOQUX" else "8"
        elif c == "X":
            code = "8" if prev in "CKQ" else "48"
        elif c == "L":
            code = "5"
        elif c in "MN":
            code = "6"
        elif c == "R":
            code = "7"
        elif c in "SZ":
            code = "8"
        else:
            code = "-"
        codes.append(code)
    out: list[str] = []
    for code in "".join(codes):
        if code == "-" or (out and out[-1] == code):
            if code != "-":
                continue
            continue
        out.append(code)
    if not out:
        return ""
    head, tail = out[0], [c for c in out[1:] if c != "0"]
    return head + "".join(tail)


def phonetic_words(value: str) -> list[str]:
    """Koelner Phonetik codes of each word of a name's alphabetic group."""
    words = _SPLIT.split(normalize_pn(value))
    return [code for code in (_koelner(w) for w in words if w) if code]


def phonetic_key(value: str) -> str:
    """The stored fuzzy-matching key: codes of all words, space separated and space padded."""
    codes = phonetic_words(value)
    return f" {' '.join(codes)} " if codes else ""
