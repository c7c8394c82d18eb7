"""Build kquant/data/corpus.txt: plain English sentences taken from the docstrings of
Python's standard library (text that ships with every Python, so the corpus is reproducible
without a download). Run once; the output is committed, so the demo never depends on the
Python version it runs under.

    python tools/make_corpus.py [--stdlib DIR] [--out kquant/data/corpus.txt] [--max 800]

Docstrings are read with ``ast`` (no module is imported). A sentence is kept when it has
6-40 words, starts with a capital letter, ends with '.', '!' or '?', and looks like prose:
no code punctuation, no dotted names, no underscores, mostly lower-case alphabetic words.
Order is deterministic: files sorted by path, sentences in source order, first occurrence
wins; when there are more than ``--max`` candidates an evenly spaced subset is kept, so the
corpus spans many modules instead of the first few.
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import sys
import sysconfig

# folders whose docstrings are test scaffolding, generated tables or not English prose
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__",
             "encodings", "pydoc_data", "turtledemo", "ensurepip", "venv", "msilib"}
BAD_CHARS = re.compile(r"[_`=<>{}\[\]()*#\\/|~^$@%&+;\"]|\.\.|--|:\S")
WORD = re.compile(r"^[A-Za-z][a-z]*(?:'[a-z]+)?[,.:!?]?$")
SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
ABBREV = re.compile(r"\b(?:e\.g|i\.e|etc|vs|Mr|Dr|cf|No)\.$")


def docstrings(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def sentences(doc: str):
    # paragraphs first: parameter lists and examples are separated by blank lines
    for para in re.split(r"\n\s*\n", doc):
        lines = para.splitlines()
        if any(ln.startswith((" ", "\t", ">>>", "-", "*", ":")) for ln in lines):
            continue  # indented blocks, doctests, bullet lists, field lists
        text = " ".join(ln.strip() for ln in lines)
        for s in SENT_SPLIT.split(text):
            yield s.strip()


def is_prose(s: str) -> bool:
    words = s.split()
    if not 6 <= len(words) <= 40:
        return False
    if not (s[0].isupper() and s[-1] in ".!?") or BAD_CHARS.search(s) or ABBREV.search(s):
        return False
    if any(not WORD.match(w) for w in words):  # dotted names, digits, CamelCase, quotes
        return False
    if any(w.isupper() and len(w) > 1 for w in words):  # acronyms often mean identifiers
        return False
    if s.count(",") > 4:  # lists of option names, not prose
        return False
    # the sentence must hold one final stop only (no "Returns x. See y" leftovers)
    return s[:-1].count(".") == 0 and s[:-1].count("?") == 0 and s[:-1].count("!") == 0


def collect(stdlib: str):
    seen, out = set(), []
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("test"))
        files.extend(os.path.join(root, n) for n in names if n.endswith(".py") and not n.startswith("test"))
    for path in sorted(files, key=lambda p: os.path.relpath(p, stdlib)):
        for doc in docstrings(path):
            for s in sentences(doc):
                key = s.lower()
                if key not in seen and is_prose(s):
                    seen.add(key)
                    out.append(s)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "kquant", "data", "corpus.txt"))
    ap.add_argument("--max", type=int, default=800)
    args = ap.parse_args(argv)
    sents = collect(args.stdlib)
    if len(sents) > args.max:  # evenly spaced, deterministic
        step = len(sents) / args.max
        sents = [sents[int(i * step)] for i in range(args.max)]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(sents) + "\n")
    print(f"wrote {len(sents)} sentences to {os.path.normpath(args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
