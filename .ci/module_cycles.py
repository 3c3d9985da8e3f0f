#!/usr/bin/env python3
"""Fails when two modules of one crate import each other.

A module is a file under a crate's src/ (or a folder with mod.rs); it
depends on the modules it names as `crate::X` (or `super::X` from a child
of the same folder) outside comments and test modules. Two modules that
depend on each other are a cycle: one of them holds something the other's
concern needs, and that thing belongs in a module of its own.

Usage: module_cycles.py SRC_DIR...   (each a crate's src/ or a folder in it)
"""
import os
import re
import sys


def module_files(src):
    mods = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            parts = os.path.relpath(path, src)[:-3].split("/")
            if parts[-1] == "mod":
                parts = parts[:-1]
            if not parts or parts[0] in ("lib", "main", "bin"):
                continue
            mods.setdefault(parts[0], []).append(path)
    return mods


def code_of(path):
    text = open(path, encoding="utf-8").read()
    text = re.sub(r"#\[cfg\(test\)\]\s*mod tests\s*\{.*", "", text, flags=re.S)
    return "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("//"))


def cycles(src, prefix):
    mods = module_files(src)
    deps = {}
    for m, files in mods.items():
        found = set()
        for path in files:
            for x in re.findall(prefix + r"([a-z_0-9]+)", code_of(path)):
                if x != m and x in mods:
                    found.add(x)
        deps[m] = found
    return sorted((a, b) for a in deps for b in deps[a] if a < b and a in deps.get(b, ()))


def main():
    bad = 0
    for src in sys.argv[1:]:
        is_crate = os.path.exists(os.path.join(src, "lib.rs")) or os.path.exists(
            os.path.join(src, "main.rs")
        )
        prefix = r"crate::" if is_crate else r"super::"
        for a, b in cycles(src, prefix):
            print(f"import cycle in {src}: {a} <-> {b}")
            bad += 1
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
