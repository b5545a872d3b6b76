#!/usr/bin/env python3
"""Writes the configuration reference of the book from the JSON Schema of the file.

    scripts/config-reference.py            # (re)write docs/src/reference/configuration.md
    scripts/config-reference.py --check    # exit 1, with a diff, when the page is not current
    scripts/config-reference.py --paths    # print every key path of the schema, one a line

The schema is `config/stoa.schema.json`, which `stoa schema` generates (schemars) from the
structs the file is read into; its descriptions are the doc comments of those structs. Every
table of the file gets a section (`[server]`, `[rate_limits.<name>]`, `[[routes]]`, ...) and
every key a row with its full path, its type and its description. Key paths are written as
`server.listen`, `rate_limits.<name>.burst`, `routes[].cache.ttl`: `<name>` for a table of
named tables, `[]` for an element of an array. Python 3 standard library only.
"""

import argparse
import difflib
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "config" / "stoa.schema.json"
PAGE = ROOT / "docs" / "src" / "reference" / "configuration.md"


def anchor(heading):
    """The id mdBook gives a heading: lower case, letters, digits, `_` and `-`, spaces as `-`."""
    out = []
    for c in heading.strip():
        if c.isalnum() or c in "_-":
            out.append(c.lower())
        elif c.isspace():
            out.append("-")
    return "".join(out)


class Reference:
    def __init__(self, schema):
        self.schema = schema
        self.defs = schema.get("$defs") or schema.get("definitions") or {}
        self.sections = []  # (path, node, description)
        self.paths = []  # every key path, in page order
        self.scalar_defs = []  # names of the value types used (Duration, Size, ...)

    # ---- schema walking -------------------------------------------------------------------

    def ref_name(self, node):
        ref = node.get("$ref") if isinstance(node, dict) else None
        if not ref:
            return None
        for prefix in ("#/$defs/", "#/definitions/"):
            if ref.startswith(prefix):
                return ref[len(prefix):]
        raise SystemExit(f"config-reference: unsupported $ref {ref!r}")

    def resolve(self, node):
        """Follows $ref; the referring node's own keys (description) win over the target's."""
        seen = set()
        while isinstance(node, dict) and "$ref" in node:
            name = self.ref_name(node)
            if name in seen:
                raise SystemExit(f"config-reference: $ref cycle through {name}")
            seen.add(name)
            target = self.defs.get(name)
            if target is None:
                raise SystemExit(f"config-reference: no definition {name!r}")
            merged = dict(target)
            merged.update({k: v for k, v in node.items() if k != "$ref"})
            node = merged
        return node

    def variants(self, node):
        return node.get("anyOf") or node.get("oneOf") or []

    def walk_value(self, node, path):
        """Registers the tables reachable from a key's value, whose own path is `path`."""
        if not isinstance(node, dict):
            return
        node = self.resolve(node)
        if "properties" in node:
            self.table(node, path)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            self.walk_value(extra, path + ".<name>")
        items = node.get("items")
        if isinstance(items, dict):
            self.walk_value(items, path + "[]")
        for variant in self.variants(node):
            self.walk_value(variant, path)

    def table(self, node, path):
        self.sections.append((path, node))
        for key, value in node.get("properties", {}).items():
            child = f"{path}.{key}" if path else key
            self.paths.append(child)
            self.walk_value(value, child)

    def build(self):
        self.table(self.schema, "")
        return self

    # ---- rendering ------------------------------------------------------------------------

    def type_of(self, node, depth=0):
        if node is True or node == {}:
            return "any value"
        if not isinstance(node, dict):
            return "?"
        name = self.ref_name(node)
        if name is not None:
            target = self.defs.get(name, {})
            if "properties" in target:
                return "table"
            if not name.startswith("Raw"):
                # A named value type (Duration, Size): described once, at the end of the page.
                if name not in self.scalar_defs:
                    self.scalar_defs.append(name)
                return f"[{name.lower()}](#value-types)"
            return self.type_of(target, depth)
        if "enum" in node:
            return "one of " + ", ".join(f"`{json.dumps(v)}`" for v in node["enum"])
        variants = self.variants(node)
        if variants:
            return " or ".join(self.type_of(v, depth + 1) for v in variants)
        kind = node.get("type")
        if isinstance(kind, list):
            return " or ".join(kind)
        if kind == "array":
            return "array of " + self.plural(self.type_of(node.get("items", True), depth + 1))
        if kind == "object":
            if "properties" in node:
                return "table"
            extra = node.get("additionalProperties")
            if isinstance(extra, dict):
                return "table of named " + self.plural(self.type_of(extra, depth + 1))
            return "table"
        if kind == "number":
            return "number"
        return kind or "any value"

    @staticmethod
    def plural(text):
        words = {"string": "strings", "table": "tables", "integer": "integers",
                 "number": "numbers", "boolean": "booleans", "any value": "any values"}
        return words.get(text, text)

    def value_type(self, node):
        """The name of a named value type (Duration, Size) a key refers to, or None."""
        name = self.ref_name(node)
        if name is not None and "properties" not in self.defs.get(name, {}) \
                and not name.startswith("Raw"):
            return name
        return None

    def constraints(self, node):
        if not isinstance(node, dict):
            return []
        if self.value_type(node):
            node = {k: v for k, v in node.items() if k in ("default",)}
        node = self.resolve(node)
        out = []
        if "minimum" in node and "maximum" in node:
            out.append(f"{node['minimum']} to {node['maximum']}")
        elif "minimum" in node:
            out.append(f"at least {node['minimum']}")
        elif "maximum" in node:
            out.append(f"at most {node['maximum']}")
        if "pattern" in node and node.get("type") == "string":
            out.append(f"matches `{node['pattern']}`")
        if "default" in node:
            out.append(f"default `{json.dumps(node['default'])}`")
        return out

    @staticmethod
    def text(description):
        return " ".join(description.split()).replace("|", "\\|")

    @staticmethod
    def heading(path):
        if path == "":
            return "Top level"
        toml = path.replace("[]", "")
        toml = f"[[{toml}]]" if path.endswith("[]") else f"[{toml}]"
        if "[]" in path and not path.endswith("[]"):
            return f"`{toml}` (`{path}`)"
        return f"`{toml}`"

    def render(self):
        lines = [
            "<!-- Generated by scripts/config-reference.py from config/stoa.schema.json: do not",
            "     edit; run `make docs` (or the script) after changing the schema. -->",
            "",
            "# Configuration reference",
            "",
            "Every key of the configuration file, generated from its JSON Schema",
            "(`config/stoa.schema.json`, written by `stoa schema`). Keys are given by their full path:",
            "`<name>` stands for the name of an entry of a table of named tables (an upstream, a",
            "rate-limit policy), `[]` for an element of an array (a route, a leg). Unknown keys are",
            "errors. Defaults and what each setting does are in the chapters, starting with",
            "[Configuration](../configuration.md); `stoa check --config <file>` validates a file.",
            "",
        ]
        for path, node in self.sections:
            lines.append(f"## {self.heading(path)}")
            lines.append("")
            if path and node.get("description"):
                lines.append(self.text(node["description"]))
                lines.append("")
            required = set(node.get("required", []))
            lines.append("| key | type | description |")
            lines.append("| --- | --- | --- |")
            for key, value in node.get("properties", {}).items():
                full = f"{path}.{key}" if path else key
                resolved = self.resolve(value) if isinstance(value, dict) else value
                kind = self.type_of(value)
                notes = self.constraints(value)
                if key in required:
                    notes.insert(0, "required")
                if notes:
                    kind += " (" + "; ".join(notes) + ")"
                desc = ""
                if isinstance(value, dict) and self.value_type(value):
                    # The key's own doc comment; the type's is under Value types.
                    desc = value.get("description", "")
                elif isinstance(resolved, dict):
                    desc = resolved.get("description", "")
                    if not desc:
                        # A table of named tables: the named table's own description.
                        extra = resolved.get("additionalProperties")
                        if isinstance(extra, dict):
                            desc = self.resolve(extra).get("description", "")
                below = self.subsections(full)
                if below:
                    desc = (self.text(desc) + " " if desc else "") + "See " + ", ".join(
                        below) + "."
                else:
                    desc = self.text(desc)
                lines.append(f"| `{full}` | {kind} | {desc} |")
            lines.append("")
        if self.scalar_defs:
            lines.append("## Value types")
            lines.append("")
            for name in self.scalar_defs:
                node = self.defs[name]
                desc = self.text(node.get("description", ""))
                examples = node.get("examples") or []
                if examples:
                    desc += " Examples: " + ", ".join(f"`{json.dumps(e)}`" for e in examples) + "."
                lines.append(f"- **{name.lower()}**: {desc}")
            lines.append("")
        return "\n".join(lines)

    def subsections(self, path):
        """Headings of the tables found under a key: the key itself, its `<name>` or `[]`."""
        out = []
        for other, _ in self.sections:
            rest = other[len(path):] if other.startswith(path) else None
            if rest in ("", ".<name>", "[]"):
                out.append(f"[{self.heading(other).split(' (')[0]}](#{anchor(self.heading(other))})")
        return out


def generate(schema_path):
    schema = json.loads(schema_path.read_text())
    ref = Reference(schema).build()
    page = ref.render().rstrip("\n") + "\n"
    missing = [p for p in ref.paths if f"`{p}`" not in page]
    if missing:
        raise SystemExit("config-reference: keys missing from the page: " + ", ".join(missing))
    return page, ref.paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 when the page differs from what it generates")
    parser.add_argument("--paths", action="store_true", help="print every key path and exit")
    parser.add_argument("--schema", type=pathlib.Path, default=SCHEMA)
    parser.add_argument("--out", type=pathlib.Path, default=PAGE)
    args = parser.parse_args()

    page, paths = generate(args.schema)
    shown = args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out
    if args.paths:
        print("\n".join(paths))
        return 0
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current == page:
            return 0
        diff = difflib.unified_diff(current.splitlines(), page.splitlines(),
                                    f"{shown} (checked in)", f"{shown} (generated)",
                                    lineterm="")
        sys.stdout.write("\n".join(diff) + "\n")
        print(f"config-reference: {shown} is not what the schema generates; "
              "run `make docs` or scripts/config-reference.py", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.out.exists() or args.out.read_text() != page:
        args.out.write_text(page)
        print(f"config-reference: wrote {shown} ({len(paths)} keys)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
