#!/usr/bin/python3
"""apidocs.py - build tool: writes the API reference jemd serves at /docs, one
static HTML page generated from openapi.yaml (so the two cannot drift).

Every operation gets its method, path, summary, description, parameters,
request body and responses; schemas under components are listed once and
linked.  No script: the page is plain HTML styled by /ui/docs.css, readable on
a phone and by a screen reader (headings, landmarks, a contents list).

usage: apidocs.py openapi.yaml OUT.html
"""
import html
import re
import sys

import yaml

METHODS = ("get", "post", "put", "patch", "delete", "head", "options")
# schema keywords shown as "constraint: value" after the type
CONSTRAINTS = ("format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
               "minLength", "maxLength", "minItems", "maxItems", "pattern", "default")


def esc(s):
    return html.escape(str(s), quote=True)


def inline(s):
    """`code`, **strong** and *em* of the spec's Markdown, the rest escaped."""
    out = []
    for i, part in enumerate(re.split(r"`([^`]*)`", s)):
        if i % 2:
            out.append("<code>%s</code>" % esc(part))
            continue
        t = esc(part)
        t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
        t = re.sub(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])", r"<em>\1</em>", t)
        out.append(t)
    return "".join(out)


def markdown(s):
    """Paragraphs and "- " lists: what the spec's descriptions use."""
    if not s:
        return ""
    out = []
    for block in re.split(r"\n\s*\n", str(s).strip()):
        lines = [l.strip() for l in block.splitlines()]
        if lines and all(l.startswith("- ") for l in lines):
            out.append("<ul>%s</ul>" % "".join("<li>%s</li>" % inline(l[2:]) for l in lines))
        else:
            out.append("<p>%s</p>" % inline(" ".join(lines)))
    return "".join(out)


def slug(s):
    return re.sub(r"[^A-Za-z0-9_-]+", "-", s).strip("-")


class Doc:
    def __init__(self, spec):
        self.spec = spec

    def deref(self, o):
        """Follows a local $ref (#/components/...) to the object it names."""
        seen = 0
        while isinstance(o, dict) and "$ref" in o and seen < 16:
            node = self.spec
            for key in o["$ref"].lstrip("#/").split("/"):
                node = node[key.replace("~1", "/").replace("~0", "~")]
            o, seen = node, seen + 1
        return o

    def schema(self, s):
        """One schema as HTML: a type line, constraints, properties nested."""
        if not isinstance(s, dict):
            return ""
        ref = s.get("$ref", "")
        if ref.startswith("#/components/schemas/"):
            name = ref.rsplit("/", 1)[1]
            return '<a href="#schema-%s">%s</a>' % (slug(name), esc(name))
        if ref:
            return self.schema(self.deref(s))
        parts = []
        for key in ("oneOf", "anyOf", "allOf"):
            if key in s:
                word = {"oneOf": "one of", "anyOf": "any of", "allOf": "all of"}[key]
                parts.append("%s:<ul>%s</ul>" % (word, "".join(
                    "<li>%s</li>" % self.schema(x) for x in s[key])))
        typ = s.get("type")
        if typ == "array":
            parts.insert(0, "array of " + (self.schema(s.get("items", {})) or "anything"))
        elif typ:
            parts.insert(0, "<span class=\"type\">%s</span>" % esc(typ))
        notes = []
        if s.get("nullable"):
            notes.append("or null")
        if "enum" in s:
            notes.append("one of " + ", ".join(
                "<code>%s</code>" % esc(json_text(v)) for v in s["enum"]))
        for key in CONSTRAINTS:
            if key in s:
                notes.append("%s <code>%s</code>" % (esc(key), esc(json_text(s[key]))))
        if notes:
            parts.insert(1 if parts else 0, "(%s)" % "; ".join(notes))
        desc = markdown(s.get("description"))
        props = s.get("properties") or {}
        if props:
            req = set(s.get("required", []))
            rows = []
            for name, p in props.items():
                rows.append('<li><code class="prop">%s</code>%s: %s</li>' % (
                    esc(name), ' <span class="req">required</span>' if name in req else "",
                    self.schema(p)))
            extra = s.get("additionalProperties")
            if isinstance(extra, dict):
                rows.append("<li><em>other names</em>: %s</li>" % self.schema(extra))
            parts.append('<ul class="props">%s</ul>' % "".join(rows))
        elif isinstance(s.get("additionalProperties"), dict):
            parts.append("map of names to " + self.schema(s["additionalProperties"]))
        return " ".join(parts) + desc

    def content(self, content):
        items = []
        for ctype, media in (content or {}).items():
            body = self.schema((media or {}).get("schema", {}))
            items.append("<li><code>%s</code>%s</li>" % (esc(ctype), ": " + body if body else ""))
        return '<ul class="media">%s</ul>' % "".join(items) if items else ""

    def parameters(self, params):
        rows = []
        for p in params:
            p = self.deref(p)
            rows.append(
                '<li><code class="prop">%s</code> <span class="in">in %s</span>%s: %s%s</li>' % (
                    esc(p.get("name")), esc(p.get("in")),
                    ' <span class="req">required</span>' if p.get("required") else "",
                    self.schema(p.get("schema", {})), markdown(p.get("description"))))
        return '<ul class="params">%s</ul>' % "".join(rows)

    def responses(self, responses):
        out = []
        for code, r in responses.items():
            r = self.deref(r)
            heads = ""
            if r.get("headers"):
                heads = "<p>Headers: %s</p>" % ", ".join(
                    "<code>%s</code>" % esc(h) for h in r["headers"])
            out.append('<li><span class="code">%s</span> %s%s%s</li>' % (
                esc(code), markdown(r.get("description")), heads,
                self.content(r.get("content"))))
        return '<ul class="responses">%s</ul>' % "".join(out)

    def security(self, op):
        sec = op.get("security", self.spec.get("security"))
        if not sec:
            return "none"
        schemes = [" and ".join(s) if s else "none" for s in sec]
        return " or ".join(schemes)

    def operation(self, path, method, op, path_params):
        oid = op.get("operationId") or slug(method + path)
        h = ['<section class="op" id="op-%s" aria-labelledby="h-%s">' % (slug(oid), slug(oid)),
             '<h3 id="h-%s"><span class="method m-%s">%s</span> <code class="path">%s</code></h3>'
             % (slug(oid), method, method.upper(), esc(path))]
        if op.get("summary"):
            h.append('<p class="summary">%s</p>' % inline(op["summary"]))
        h.append(markdown(op.get("description")))
        h.append('<p class="meta">Operation <code>%s</code>; authorization: %s.</p>'
                 % (esc(oid), esc(self.security(op))))
        params = list(path_params) + list(op.get("parameters", []))
        if params:
            h.append("<h4>Parameters</h4>" + self.parameters(params))
        if "requestBody" in op:
            rb = self.deref(op["requestBody"])
            h.append("<h4>Request body%s</h4>" % (" (required)" if rb.get("required") else ""))
            h.append(markdown(rb.get("description")) + self.content(rb.get("content")))
        h.append("<h4>Responses</h4>" + self.responses(op.get("responses", {})))
        h.append("</section>")
        return "\n".join(h)

    def page(self):
        spec, info = self.spec, self.spec.get("info", {})
        title = "%s %s: API reference" % (info.get("title", "API"), info.get("version", ""))
        toc, body = [], []
        for path, item in spec.get("paths", {}).items():
            ops = [(m, item[m]) for m in METHODS if m in item]
            links = ", ".join('<a href="#op-%s">%s</a>' % (
                slug(op.get("operationId") or slug(m + path)), m.upper()) for m, op in ops)
            toc.append("<li><code>%s</code>: %s</li>" % (esc(path), links))
            body.append('<section class="path" aria-labelledby="p-%s">' % slug(path or "root"))
            body.append('<h2 id="p-%s"><code>%s</code></h2>' % (slug(path or "root"), esc(path)))
            for m, op in ops:
                body.append(self.operation(path, m, op, item.get("parameters", [])))
            body.append("</section>")
        schemas = spec.get("components", {}).get("schemas", {})
        sch = ['<section aria-labelledby="h-schemas"><h2 id="h-schemas">Schemas</h2>']
        for name, s in schemas.items():
            sch.append('<section class="schema" id="schema-%s" aria-labelledby="s-%s">'
                       '<h3 id="s-%s">%s</h3>%s</section>'
                       % (slug(name), slug(name), slug(name), esc(name), self.schema(s)))
        sch.append("</section>")
        auth = []
        for name, s in spec.get("components", {}).get("securitySchemes", {}).items():
            auth.append("<li><code>%s</code>: %s %s%s</li>" % (
                esc(name), esc(s.get("type", "")), esc(s.get("scheme", "")),
                markdown(s.get("description"))))
        return "\n".join([
            "<!doctype html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            "<title>%s</title>" % esc(title),
            '<link rel="icon" href="data:,">',
            '<link rel="stylesheet" href="/ui/docs.css">',
            "</head>",
            "<body>",
            '<a class="skip" href="#main">Skip to the reference</a>',
            "<header>",
            "<h1>%s</h1>" % esc(title),
            '<p>Generated from <a href="/openapi.yaml">openapi.yaml</a> when jemd was built. '
            '<a href="/">Try the model</a>.</p>',
            "</header>",
            '<nav aria-labelledby="h-toc"><h2 id="h-toc">Routes</h2>',
            '<ul class="toc">%s</ul>' % "".join(toc),
            '<p><a href="#h-schemas">Schemas</a></p></nav>',
            '<main id="main">',
            '<section aria-labelledby="h-about"><h2 id="h-about">About</h2>%s' % markdown(
                info.get("description")),
            "<h3>Authorization</h3><ul>%s</ul></section>" % "".join(auth),
            "\n".join(body),
            "\n".join(sch),
            "</main>",
            "</body>",
            "</html>",
            ""])


def json_text(v):
    if v is True:
        return "true"
    if v is False:
        return "false"
    if v is None:
        return "null"
    return str(v)


def main():
    if len(sys.argv) != 3:
        sys.stderr.write("usage: apidocs.py openapi.yaml OUT.html\n")
        return 2
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = yaml.safe_load(f)
    text = Doc(spec).page()
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
