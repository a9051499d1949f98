#!/usr/bin/env python3
"""Structural checks of src/: no function over the line limit outside tests and the SQL text
builders, and no cycle in the import graph between sibling modules.

Usage: scripts/structure.py [--limit N] [--report]   (exit 1 when a check fails)

A function's length counts from its `fn` line to its closing brace. Code inside a
`#[cfg(test)]` module is skipped (inline, or a file declared `#[cfg(test)] mod name;`), and so
is a function whose doc or attribute lines carry
`structure: sql-text` (a builder of SQL text, which reads best as one piece).

The import graph has an edge from module a to module b when a's file names `crate::b` (or
`super::b` / `self::b` inside a folder) and both are children of the same parent. A folder's
`mod.rs` stands for the folder itself: its children may use it (that is the parent, not a
sibling), so only sibling edges can form a cycle.
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+\"C\"\s+)?fn\s+(\w+)")


def strip_strings(line):
    line = re.sub(r'r#+".*?"#+', '""', line)
    line = re.sub(r'"(\\.|[^"\\])*"', '""', line)
    line = re.sub(r"'(\\.|[^'\\])'", "' '", line)
    return line.split("//", 1)[0]


def module_path(path):
    rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib", "main"):
        rel = rel[:-1]
    return rel


def code_lines(lines):
    """Each line's code: strings and comments blanked, the inside of a raw string that spans
    lines left empty."""
    out = []
    in_raw = False
    for line in lines:
        if in_raw:
            in_raw = '"#' not in line
            out.append("")
            continue
        if re.search(r'r#+"', line) and not re.search(r'r#+".*"#', line):
            in_raw = True
            line = line.split("r#", 1)[0]
        out.append(strip_strings(line))
    return out


def body_end(codes, i):
    """The index of the line closing the function that starts at line `i`, or None for a
    declaration without a body."""
    d = 0
    opened = False
    for j in range(i, len(codes)):
        c = codes[j]
        if not opened and ";" in c and "{" not in c:
            return None
        for ch in c:
            if ch == "{":
                d += 1
                opened = True
            elif ch == "}":
                d -= 1
        if opened and d == 0:
            return j
    return None


def long_functions(path, limit):
    lines = open(path, encoding="utf-8").read().split("\n")
    codes = code_lines(lines)
    out = []
    skip_depth = None
    depth = 0
    pending_test = False
    for i, code in enumerate(codes):
        if "#[cfg(test)]" in code:
            pending_test = True
        m = FN.match(code)
        if skip_depth is None and m and not pending_test:
            marker = any("structure: sql-text" in lines[j] for j in range(max(0, i - 12), i))
            end = body_end(codes, i)
            if end is not None and end - i + 1 > limit and not marker:
                out.append((end - i + 1, m.group(7), i + 1))
        opens = code.count("{")
        closes = code.count("}")
        if pending_test and opens:
            if re.match(r"^\s*(pub(\([^)]*\))?\s+)?mod\s+\w+", code) and skip_depth is None:
                skip_depth = depth
            pending_test = False
        depth += opens - closes
        if skip_depth is not None and depth <= skip_depth:
            skip_depth = None
    return out


def imports(path, siblings, parent):
    text = open(path, encoding="utf-8").read()
    text = re.split(r"#\[cfg\(test\)\]\s*mod\s+\w+", text)[0]
    names = set()
    prefix = "crate::" + "::".join(parent) + "::" if parent else "crate::"
    for s in siblings:
        pats = [re.escape(prefix + s) + r"\b"]
        if parent:
            pats.append(r"\bsuper::" + re.escape(s) + r"\b")
        # grouped imports: use crate::{a, b::c}
        if any(re.search(p, text) for p in pats):
            names.add(s)
    for grp in re.findall(re.escape(prefix.rstrip(":")) + r"::\{([^}]*)\}", text, re.S):
        for item in re.split(r"[,\s]+", grp):
            head = item.split("::", 1)[0]
            if head in siblings:
                names.add(head)
    if parent:
        for grp in re.findall(r"\bsuper::\{([^}]*)\}", text, re.S):
            for item in re.split(r"[,\s]+", grp):
                head = item.split("::", 1)[0]
                if head in siblings:
                    names.add(head)
    return names


def cycles():
    files = {}
    for d, _, fs in os.walk(ROOT):
        for f in fs:
            if f.endswith(".rs"):
                p = os.path.join(d, f)
                files[tuple(module_path(p))] = p
    groups = {}
    for mp, p in files.items():
        if mp:
            groups.setdefault(mp[:-1], {})[mp[-1]] = mp
    found = []
    for parent, kids in groups.items():
        graph = {}
        for name, mp in kids.items():
            sources = [p for m, p in files.items() if m[: len(mp)] == mp]
            deps = set()
            for src in sources:
                deps |= imports(src, set(kids) - {name}, list(parent))
            graph[name] = deps
        # Tarjan-free: DFS for a cycle
        state = {}
        stack = []

        def visit(n):
            state[n] = 1
            stack.append(n)
            for m in sorted(graph[n]):
                if state.get(m) == 1:
                    found.append("::".join(list(parent) + [""]) + " -> ".join(stack[stack.index(m):] + [m]))
                elif m not in state:
                    visit(m)
            stack.pop()
            state[n] = 2

        for n in sorted(graph):
            if n not in state:
                visit(n)
    return found


def test_module_files():
    """The files of modules declared `#[cfg(test)] mod name;` (their code is test code)."""
    out = set()
    decl = re.compile(r"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;")
    for d, _, fs in os.walk(ROOT):
        for f in fs:
            if not f.endswith(".rs"):
                continue
            text = open(os.path.join(d, f), encoding="utf-8").read()
            here = d if f in ("mod.rs", "lib.rs", "main.rs") else os.path.join(d, f[:-3])
            for name in decl.findall(text):
                out.add(os.path.normpath(os.path.join(here, name + ".rs")))
                out.add(os.path.normpath(os.path.join(here, name, "mod.rs")))
    return out


def main():
    limit = 80
    args = sys.argv[1:]
    if "--limit" in args:
        limit = int(args[args.index("--limit") + 1])
    bad = []
    tests = test_module_files()
    for d, _, fs in os.walk(ROOT):
        for f in sorted(fs):
            if f.endswith(".rs") and os.path.normpath(os.path.join(d, f)) not in tests:
                p = os.path.join(d, f)
                for n, name, line in long_functions(p, limit):
                    bad.append(f"{os.path.relpath(p, os.path.join(ROOT, '..'))}:{line}: fn {name} is {n} lines (limit {limit})")
    cyc = cycles()
    for b in sorted(bad):
        print(b)
    for c in cyc:
        print(f"import cycle: {c}")
    if bad or cyc:
        sys.exit(1)
    print(f"structure: no function over {limit} lines, no import cycle")


if __name__ == "__main__":
    main()
