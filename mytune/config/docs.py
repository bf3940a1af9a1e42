"""One-line field docs read from the trailing `# comment` on each field's line of a params dataclass.

Params files document a field where it is declared (`lr: float = 2e-5  # peak learning rate`); `--help` and the
missing-path messages show that text, so the docs live in one place and cannot drift from the fields.
"""

import dataclasses
import inspect
import io
import textwrap
import tokenize


def field_docs(params_cls: type) -> dict[str, str]:
    """Map field name -> its trailing comment (without `#`); fields without a comment are left out."""
    docs: dict[str, str] = {}
    for cls in reversed(params_cls.__mro__):  # a subclass's comment wins over its base's
        if dataclasses.is_dataclass(cls):
            docs.update(_class_body_comments(cls))
    names = {f.name for f in dataclasses.fields(params_cls)}
    return {name: doc for name, doc in docs.items() if name in names}


def _class_body_comments(cls: type) -> dict[str, str]:
    """`name: type = default  # doc` statements directly in the class body -> {name: doc}."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (OSError, TypeError, tokenize.TokenError, IndentationError, SyntaxError):
        return {}
    docs: dict[str, str] = {}
    depth = 0
    statement: list[tokenize.TokenInfo] = []
    for tok in tokens:
        if tok.type == tokenize.INDENT:
            depth += 1
            continue
        if tok.type == tokenize.DEDENT:
            depth -= 1
            continue
        if tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            if depth == 1:  # the class body (depth 0 is the `class` line itself)
                name, doc = _annotated_name_and_comment(statement)
                if name and doc:
                    docs[name] = doc
            statement = []
            continue
        if tok.type != tokenize.NL:
            statement.append(tok)
    return docs


def _annotated_name_and_comment(statement: list[tokenize.TokenInfo]) -> tuple[str | None, str | None]:
    code = [t for t in statement if t.type != tokenize.COMMENT]
    if len(code) < 2 or code[0].type != tokenize.NAME or code[1].string != ":":
        return None, None
    comments = [t for t in statement if t.type == tokenize.COMMENT]
    if not comments:
        return code[0].string, None
    first_line = code[0].start[0]
    same_line = [c for c in comments if c.start[0] == first_line]
    text = (same_line or comments)[-1].string.lstrip("#").strip()
    return code[0].string, text or None
